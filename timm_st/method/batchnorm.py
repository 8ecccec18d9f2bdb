"""BatchNorm handling for sub-network passes, and re-estimation of running statistics."""
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from .backends import eager_blocks

__all__ = ['frozen_running_stats', 'recalibrate_bn', 'cumulative_momentum']


def _stat_norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


def cumulative_momentum(norms: Iterable[nn.Module], batches_seen: int) -> None:
    """Set the momentum of `norms` for the next batch so that, from reset statistics, their running
    statistics become the equal-weight average of the batches: 1 / (k + 1) before batch k (0-based).
    `momentum=None` computes the same, but every norm layer would read its `num_batches_tracked` back to the
    host on every batch (a host-device sync per layer per batch, and a value dynamo would guard on)."""
    for m in norms:
        m.momentum = 1.0 / (batches_seen + 1)


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, norm layers normalise with batch statistics (in train mode) but leave
    running_mean / running_var / num_batches_tracked untouched (also with momentum=None)."""
    norms = _stat_norms(model)
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@torch.no_grad()
def recalibrate_bn(model: Union[nn.Module, Sequence[nn.Module]], loader: Iterable, num_images: int,
                   device: Optional[torch.device] = None, autocast: Callable[[], ContextManager] = nullcontext) -> int:
    """Re-estimate the running statistics of the norm layers of `model` (or of several models, e.g. the live
    model and its EMA, from the same images in one pass) on `num_images` training images.

    Statistics are reset and re-accumulated as an equal-weight average over batches, with the full
    network in train mode, as the authors do before each validation. Returns the number of images used.
    Each batch goes to the device of each model's parameters (`device` if given). In distributed runs
    each rank estimates on its own shard; reduce afterwards (timm's `distribute_bn`) to make ranks agree.
    Blocks compiled in place run eagerly here (no graphs are added for re-estimation), and nothing is
    read back from the device per batch (`cumulative_momentum`).
    """
    models = [getattr(each, '_orig_mod', each)  # the module a torch.compile wrapper holds
              for each in ([model] if isinstance(model, nn.Module) else model)]
    norms = [m for each in models for m in _stat_norms(each)]
    if not norms or num_images <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    was_training = [each.training for each in models]
    devices = [device or next(each.parameters(), torch.empty(0)).device for each in models]
    for m in norms:
        m.reset_running_stats()
    for each in models:
        each.train()
    seen = 0
    try:
        with ExitStack() as stack:
            for each in models:
                stack.enter_context(eager_blocks(each))
            for k, batch in enumerate(loader):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                cumulative_momentum(norms, k)
                for each, where in zip(models, devices):
                    with autocast():
                        each(x.to(where))
                seen += x.shape[0]
                if seen >= num_images:
                    break
        if seen == 0:
            raise ValueError('recalibrate_bn: the loader produced no images; running statistics left unchanged')
    except BaseException:
        for m, (mean, var, count) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for each, training in zip(models, was_training):
            each.train(training)
    return seen
