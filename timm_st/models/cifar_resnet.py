"""ResNets for CIFAR (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2).

The 6n + 2 layer CIFAR family: a 3x3 conv stem (16 channels, stride 1, no max-pool), then three
stages of n basic blocks each with 16, 32 and 64 channels at strides 1, 2 and 2, global average
pooling and a linear classifier. Registered as `resnet20_cifar` (n=3), `resnet32_cifar` (5),
`resnet44_cifar` (7), `resnet56_cifar` (9) and `resnet110_cifar` (18).

Shortcuts use the paper's option B: identity wherever the shape is kept, and a 1x1 conv + BN
projection in the first block of stages 2 and 3, where the block halves the resolution and
doubles the width. The paper's headline CIFAR numbers use option A (zero-padded identity), which
has no parameters, so option B adds 2,752 parameters (about 1 % of resnet20) to the paper's counts.

No weights are published (`pretrained=True` raises timm's error). Importing this module registers a
sub-network adapter for `CifarResNet`: every block after the first with an identity shortcut is droppable.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..method.adapters import register_subnet_adapter, residual_stages

__all__ = ['CifarResNet', 'CifarBasicBlock']

def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, **dd) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False, **dd)


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: `act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))`.

    The shortcut is the identity when the block keeps the shape (`downsample is None`,
    `has_identity` true), otherwise a 1x1 conv (stride `stride`) + BN projection (option B).
    `drop_path` is the stochastic-depth rate applied to the residual branch in training.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path: float = 0.,
                 act_layer: Type[nn.Module] = nn.ReLU, norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None,
                 dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = _conv3x3(in_chs, out_chs, stride, **dd)
        self.bn1 = norm_layer(out_chs, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs, 1, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.downsample = None if stride == 1 and in_chs == out_chs else nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False, **dd)),
            ('bn', norm_layer(out_chs, **dd)),
        ]))

    @property
    def has_identity(self) -> bool:
        """Whether the shortcut is the identity (the block may be skipped without changing shapes)."""
        return self.downsample is None

    def zero_init_last(self) -> None:
        """Zero the last BN scale so the block starts as its shortcut."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(self.drop_path(out) + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth 6n + 2 with `depths=(n, n, n)`: `stem` (conv 3x3 / BN /
    ReLU) -> `stages` (`nn.Sequential`s of `CifarBasicBlock`, strides 1/2/2) -> global pool -> dropout -> `fc`.

    Args:
        depths: Number of blocks in each stage.
        widths: Channels of each stage; the stem has `widths[0]` channels.
        num_classes: Classifier outputs (0 for no classifier).
        in_chans: Input image channels.
        global_pool: timm global pooling type ('avg', 'max', 'avgmax', '' for none, ...).
        drop_rate: Dropout rate before the classifier.
        drop_path_rate: Stochastic-depth rate of the last block; block rates rise linearly from 0.
        zero_init_last: Zero the last BN scale of every block (the paper does not; off by default).
        act_layer, norm_layer: Activation and normalization layer classes.
    """

    def __init__(self, depths: Tuple[int, ...] = (3, 3, 3), widths: Tuple[int, ...] = (16, 32, 64),
                 num_classes: int = 100, in_chans: int = 3, global_pool: str = 'avg', drop_rate: float = 0.,
                 drop_path_rate: float = 0., zero_init_last: bool = False, act_layer: Type[nn.Module] = nn.ReLU,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f'depths {depths} and widths {widths} must have the same length')
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Sequential(OrderedDict([
            ('conv', _conv3x3(in_chans, widths[0], 1, **dd)),
            ('bn', norm_layer(widths[0], **dd)),
            ('act', act_layer(inplace=True)),
        ]))
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='stem.act')]

        rates = iter([drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))])  # rising from 0
        stages, in_chs = [], widths[0]
        for stage_idx, (depth, out_chs) in enumerate(zip(depths, widths)):
            stride, blocks = (1 if stage_idx == 0 else 2), []
            for i in range(depth):
                blocks.append(CifarBasicBlock(in_chs, out_chs, stride if i == 0 else 1, next(rates), act_layer,
                                              norm_layer, **dd))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** stage_idx, module=f'stages.{stage_idx}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)

        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        """Kaiming-normal (fan-out, ReLU) convs, unit-scale zero-shift BN; default init for `fc`."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, CifarBasicBlock):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise LR decay: the stem, then stages (coarse) or blocks."""
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (recompute its activations in backward)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (and the pooling, if `global_pool` is given) for `num_classes` outputs."""
        p = next(self.parameters())
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=pool_type, device=p.device, dtype=p.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # one checkpoint per block of each stage's current children, so use_subnet's sub-networks are respected
            return checkpoint_seq(self.stages, x, flatten=True)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_BLOCKS_AND_PARAMS = {3: '0.27M', 5: '0.46M', 7: '0.66M', 9: '0.85M', 18: '1.7M'}  # params at 10 classes
default_cfgs = generate_default_cfgs({f'resnet{6 * n + 2}_cifar': {
    'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0, 'interpolation': 'bilinear',
    'mean': (0.5071, 0.4865, 0.4409), 'std': (0.2673, 0.2564, 0.2762),  # CIFAR-100's
    'first_conv': 'stem.conv', 'classifier': 'fc',
} for n in _BLOCKS_AND_PARAMS})


def _register(n: int, params: str) -> None:
    """Register the entrypoint `resnet{6n + 2}_cifar` with timm (and as a name of this module)."""
    name = f'resnet{6 * n + 2}_cifar'

    def entrypoint(pretrained: bool = False, **kwargs) -> CifarResNet:
        model_args = dict(dict(depths=(n, n, n), widths=(16, 32, 64)), **kwargs)
        feature_cfg = dict(flatten_sequential=True, out_indices=(0, 1, 2, 3))
        return build_model_with_cfg(CifarResNet, name, pretrained, feature_cfg=feature_cfg, **model_args)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f'ResNet-{6 * n + 2} for CIFAR ({n} blocks per stage, ~{params} params at 10 classes).'
    globals()[name] = register_model(entrypoint)


for _n, _params in _BLOCKS_AND_PARAMS.items():
    _register(_n, _params)
register_subnet_adapter(CifarResNet, lambda model: residual_stages(model.stages, lambda b: b.downsample is None))
