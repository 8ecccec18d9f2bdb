"""Building a run: the model, the task, the training criterion, the device and the precision.

`build_model` is the one way a run's architecture is built: by `timm-st train`, by the validation (on
the meta device) and by everything that rebuilds a run's model (analyze, publish). `build_task` makes
the stimulative task of a run with a `stimulative:` section, timm's `ClassificationTask` otherwise, for
`timm-st train` and a patched train.py's `--task` alike. The criterion follows timm's `train.py` rules.
"""
import argparse
import importlib
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..method.config import StimulativeConfig
from .errors import RunError

__all__ = ['build_model', 'build_task', 'mixup_active', 'train_criterion', 'default_device',
           'import_device_modules', 'precision']


def build_model(args: Union[Mapping[str, Any], argparse.Namespace], *, num_classes: Optional[int] = None,
                pretrained: bool = False, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                checkpoint_path: str = '') -> torch.nn.Module:
    """The architecture exactly as the run built it: `timm.create_model` with the run's model arguments;
    `state_dict` is then loaded strictly."""
    import timm
    a = vars(args) if isinstance(args, argparse.Namespace) else args
    name = a.get('model')
    if not name or not timm.is_model(name):
        raise RunError(f'model {name!r} of this run is not a timm model in this environment (models of '
                       f'timm-st need `import timm_st`; others a newer timm)')
    num_classes = num_classes if num_classes is not None else a.get('num_classes')
    # as timm's train.py: --in-chans, else the channels of --input-size, else the model's default
    in_chans = a['in_chans'] if a.get('in_chans') is not None else (a['input_size'][0] if a.get('input_size') else None)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes,
            drop_rate=a.get('drop') or 0.0, drop_path_rate=a.get('drop_path'), drop_block_rate=a.get('drop_block'),
            global_pool=a.get('gp'), bn_momentum=a.get('bn_momentum'), bn_eps=a.get('bn_eps'),
            checkpoint_path=checkpoint_path or None, **(a.get('model_kwargs') or {}))
    except Exception as e:
        raise RunError(f'cannot build {name!r} with the run\'s arguments ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else e}); check model_kwargs / num_classes') from None
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise RunError(f'the weights do not fit {name!r} built with the run\'s arguments: '
                           f'{str(e).splitlines()[0][:300]}...; they belong to another architecture or '
                           f'class count') from None
    return model


def build_task(model: torch.nn.Module, config: Optional[StimulativeConfig], criterion: Optional[Callable] = None,
               device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, verbose: bool = True,
               num_epochs: Optional[int] = None):
    """The run's timm TrainingTask: stimulative training with `config`, timm's ClassificationTask without one."""
    from timm.task import ClassificationTask
    from ..method.task import StimulativeTask
    if config is None:
        return ClassificationTask(model=model, criterion=criterion, device=device, dtype=dtype, verbose=verbose)
    try:
        return StimulativeTask(model, config, criterion=criterion, num_epochs=num_epochs, device=device, dtype=dtype,
                               verbose=verbose)
    except ValueError as e:  # a model without sub-network adapter, a space that does not fit it
        raise RunError(str(e)) from None


def mixup_active(args: Any) -> bool:
    """Whether mixup or cutmix mixes the training batches (soft targets), as train.py decides."""
    return ((getattr(args, 'mixup', 0) or 0) > 0 or (getattr(args, 'cutmix', 0) or 0) > 0
            or getattr(args, 'cutmix_minmax', None) is not None)


def train_criterion(args: Any) -> torch.nn.Module:
    """The training loss timm's train.py builds for the same options."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active(args):  # mixup/cutmix make soft targets and apply the smoothing themselves
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss else LabelSmoothingCrossEntropy(
            smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()  # train.py: bce_loss without mixup or smoothing is still cross-entropy


def default_device() -> str:
    """'cuda' (timm's default) when available, else 'cpu'."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def import_device_modules(names: Optional[Sequence[str]]) -> None:
    """Import the run's `device_modules` (device backends, plugins), as train.py does."""
    for name in names or ():
        importlib.import_module(name)


def precision(device: torch.device, amp: bool, amp_dtype: str = 'float16'
              ) -> Tuple[Callable[[], ContextManager], Optional[Any]]:
    """(autocast context factory, timm's NativeScaler or None): float16 AMP scales the loss, bfloat16 does not."""
    if not amp:
        return nullcontext, None
    dtype = torch.bfloat16 if amp_dtype == 'bfloat16' else torch.float16
    from timm.utils import NativeScaler
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler
