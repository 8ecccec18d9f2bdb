"""Sub-network adapters: where a model's stages and blocks are, and running a model with a subset.

An adapter is a function `model -> list[Stage]`, registered per model class. Running a
sub-network temporarily narrows each stage container to its kept blocks, so the model's own
forward (drop-path, grad checkpointing, channels-last and all) runs exactly the sub-network.
"""
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch.nn as nn

from timm.utils.model import unwrap_model

from .plan import SubnetPlan

__all__ = ['Stage', 'register_subnet_adapter', 'subnet_stages', 'use_subnet', 'stage_depths', 'residual_stages']


@dataclass(frozen=True)
class Stage:
    """A container whose child modules are one stage's blocks, run in order.

    `droppable[i]` says whether block `i` may be skipped (it has an identity skip connection);
    the first block of a stage is never droppable.
    """

    container: nn.Module
    droppable: Tuple[bool, ...]

    def __post_init__(self):
        droppable = tuple(bool(d) for d in self.droppable)
        if len(droppable) != len(self.container._modules):
            raise ValueError(
                f'Stage has {len(self.container._modules)} blocks but {len(droppable)} droppable flags')
        object.__setattr__(self, 'droppable', (False,) + droppable[1:] if droppable else droppable)

    @property
    def depth(self) -> int:
        return len(self.droppable)

    @property
    def max_tail_drop(self) -> int:
        """How many trailing blocks an ordered (prefix) plan may skip."""
        return next((n for n, d in enumerate(reversed(self.droppable)) if not d), self.depth)


_NARROWED: 'weakref.WeakSet[nn.Module]' = weakref.WeakSet()  # containers currently narrowed by use_subnet
AdapterFn = Callable[[nn.Module], List[Stage]]
_ADAPTERS: Dict[type, AdapterFn] = {}


def register_subnet_adapter(model_cls: type, fn: Optional[AdapterFn] = None):
    """Register `fn(model) -> list[Stage]` for `model_cls` and its subclasses (usable as a decorator)."""
    def _register(f: AdapterFn) -> AdapterFn:
        _ADAPTERS[model_cls] = f
        return f
    return _register(fn) if fn is not None else _register


def subnet_stages(model: nn.Module) -> List[Stage]:
    """The stages of `model` (DDP / compiled wrappers are looked through)."""
    model = unwrap_model(model)
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            stages = _ADAPTERS[cls](model)
            if not stages:
                raise ValueError(f'The sub-network adapter for {cls.__name__} returned no stages.')
            return stages
    supported = ', '.join(sorted(c.__name__ for c in _ADAPTERS))
    raise ValueError(
        f'No sub-network adapter for model class {type(model).__name__}. Supported families: {supported}. '
        f'For another residual architecture, register one: '
        f'timm_st.register_subnet_adapter({type(model).__name__}, fn) where fn(model) returns a list of '
        f'timm_st.Stage(container, droppable) naming each stage container and which blocks have a skip.')


def stage_depths(stages: Sequence[Stage]) -> Tuple[int, ...]:
    return tuple(s.depth for s in stages)


def residual_stages(containers: Iterable[nn.Module], has_skip: Callable[[nn.Module], bool] = lambda block: True
                    ) -> List[Stage]:
    """One `Stage` per container, a block droppable when `has_skip(block)` (the first one never)."""
    return [Stage(c, tuple(has_skip(b) for b in c._modules.values())) for c in containers]


def _check_plan(stages: Sequence[Stage], plan: SubnetPlan) -> None:
    if len(plan.blocks) != len(stages):
        raise ValueError(f'SubnetPlan has {len(plan.blocks)} stages, the model has {len(stages)}')
    for s, (stage, kept) in enumerate(zip(stages, plan.blocks)):
        if kept[-1] >= stage.depth:
            raise ValueError(f'SubnetPlan stage {s} keeps block {kept[-1]} but the stage has {stage.depth}')
        bad = sorted(i for i in set(range(stage.depth)).difference(kept) if not stage.droppable[i])
        if bad:
            raise ValueError(f'SubnetPlan stage {s} skips blocks {bad}, which have no skip connection')


@contextmanager
def run_blocks(stages: Sequence[Stage], blocks: Sequence[Sequence[int]]) -> Iterator[None]:
    """Within the block, stage `s` runs its blocks `blocks[s]` in that order (any order: a lesion study swaps
    blocks; unchecked); restored on exit, also on error. `use_subnet` is this for a checked plan."""
    if any(stage.container in _NARROWED for stage in stages):
        raise RuntimeError('use_subnet: this model is already running a sub-network (nested use_subnet)')
    saved = []
    try:
        for stage, kept in zip(stages, blocks):
            modules = stage.container._modules
            if tuple(kept) == tuple(range(len(modules))):
                continue
            names = list(modules)
            saved.append((stage.container, modules))
            _NARROWED.add(stage.container)
            object.__setattr__(stage.container, '_modules', OrderedDict((names[i], modules[names[i]]) for i in kept))
        yield
    finally:
        for container, modules in reversed(saved):
            object.__setattr__(container, '_modules', modules)
            _NARROWED.discard(container)


def use_subnet(stages: Sequence[Stage], plan: SubnetPlan) -> ContextManager[None]:
    """Within the block, the model runs only `plan`'s blocks; restored on exit, also on error.

    Keep the block open through backward when grad checkpointing recomputes the forward.
    """
    _check_plan(stages, plan)
    return run_blocks(stages, plan.blocks)


def _register_builtin() -> None:
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    no_downsample = lambda b: getattr(b, 'downsample', None) is None
    register_subnet_adapter(ResNet, lambda m: residual_stages([m.layer1, m.layer2, m.layer3, m.layer4], no_downsample))
    register_subnet_adapter(RegNet, lambda m: residual_stages([m.s1, m.s2, m.s3, m.s4]))
    register_subnet_adapter(ConvNeXt, lambda m: residual_stages([stage.blocks for stage in m.stages]))
    register_subnet_adapter(VisionTransformer, lambda m: residual_stages([m.blocks]))
    for cls in (EfficientNet, MobileNetV3):
        register_subnet_adapter(cls, lambda m: residual_stages(m.blocks, lambda b: bool(getattr(b, 'has_skip', False))))


_register_builtin()
