"""Evaluation: full-network accuracy, and accuracy of sub-networks ("loafing").

`evaluate_plans` evaluates many sub-networks at once, either as a prefix tree (`tree.py`: every
shared prefix computed once per batch) or one by one with `use_subnet` (the reference); both give
the same numbers. With `bn='recalibrate'` every sub-network gets its own BatchNorm statistics,
re-estimated on calibration images, before it is evaluated.

Nothing is read back from the device per batch or per sub-network: examples, loss and correct counts
accumulate on the device (timm's task evaluator where timm has one) and are read once at the end;
re-estimation sets each batch's momentum from a host-side count (`cumulative_momentum`). Blocks that
`StimulativeTask.compile()` compiled in place run eagerly here (`eager_blocks`): evaluating adds no graphs.
"""
import functools
import itertools
import logging
import statistics
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from timm.utils.model import unwrap_model

from ..method.adapters import Stage, _check_plan, run_blocks, stage_depths, subnet_stages
from ..method.backends import eager_blocks
from ..method.batchnorm import _stat_norms, cumulative_momentum
from ..method.plan import SubnetPlan, resize_input
from ..method.sampling import resolve_sample_space
from .tree import (
    CALIB_IMAGES, PrefixTree, Route, TreeRunner, _all_modes_kept, calibration_batches, calibration_mode,
    fresh_statistics, tree_split, tree_supported,
)

__all__ = [
    'validate', 'space_plans', 'subnet_plans', 'subnet_statistics', 'evaluate_plans', 'evaluate_routes',
    'relative_flops',
]

_logger = logging.getLogger(__name__)

BN_MODES = ('running', 'recalibrate')
METHODS = ('auto', 'tree', 'each')
OnLogits = Callable[[int, torch.Tensor, torch.Tensor], None]  # (plan index, logits, targets)


class _DeviceTotals:
    """What timm's task evaluator (`timm.task.ClassificationEvaluator`, timm >= 1.0.31) accumulates, for
    older timm: cross-entropy times examples, examples, top-1 and top-5 correct, summed on the device (no
    read per batch); `num_samples` counts the examples on the host."""

    def __init__(self, device: torch.device):
        self.num_samples = 0
        self.loss_sum = torch.zeros((), dtype=torch.float32 if device.type == 'mps' else torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # examples, top-1 correct, top-5 correct

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output, n = output.detach().float(), output.shape[0]
        self.num_samples += n
        if n:
            self.loss_sum += F.cross_entropy(output, target).to(self.loss_sum.dtype) * n
            correct = output.topk(min(5, output.shape[-1]), dim=-1).indices.eq(target[:, None])
            self.counts[0] += n
            self.counts[1] += correct[:, 0].sum()
            self.counts[2] += correct.any(dim=-1).sum()

    def compute(self, distributed: bool = False) -> Dict[str, float]:
        loss_sum, counts = self.loss_sum.clone(), self.counts.clone()
        if distributed:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(counts)
        count, top1, top5 = counts.tolist()
        count = max(count, 1)
        return {'loss': loss_sum.item() / count, 'top1': 100 * top1 / count, 'top5': 100 * top5 / count}


def _evaluator(device: torch.device):
    """timm's task evaluator where timm has one (counters on the device), else `_DeviceTotals`."""
    try:
        from timm.task import ClassificationEvaluator
    except ImportError:
        return _DeviceTotals(device)
    return ClassificationEvaluator(device)


def _on_device(x: torch.Tensor, device: torch.device, channels_last: bool, non_blocking: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=non_blocking)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _counted(loader: Iterable, device: torch.device, channels_last: bool, max_samples: Optional[int]) -> Iterator:
    """`(x, y, keep)` per batch of `loader`, on the device; the first `keep` examples count (`max_samples`
    drops the padding of a distributed sampler, counted per rank in order)."""
    seen = 0
    for x, y in loader:
        keep = x.shape[0] if max_samples is None else max(0, min(x.shape[0], max_samples - seen))
        seen += keep
        yield _on_device(x, device, channels_last), y.to(device), keep


def _results(evaluators: Sequence[Any], distributed: bool) -> List[Dict[str, float]]:
    """Loss, top-1, top-5 and examples of each evaluator, summed over ranks when `distributed` (read once,
    at the end)."""
    results = [ev.compute(distributed=distributed) for ev in evaluators]
    samples = [ev.num_samples for ev in evaluators]
    if distributed and samples:
        counts = torch.tensor(samples, dtype=torch.int64, device=evaluators[0].counts.device)
        torch.distributed.all_reduce(counts)
        samples = counts.tolist()
    return [{**result, 'samples': int(n)} for result, n in zip(results, samples)]


def _report(progress: Optional[Any], n: int) -> None:
    if progress is not None:
        getattr(progress, 'update', progress)(n)  # tqdm-like, or a callable


@torch.no_grad()
def _evaluate_loader(model: nn.Module, evaluator: Any, batches: Iterable, autocast: Callable[[], ContextManager],
                     input_size: Optional[int] = None, progress: Optional[Any] = None,
                     on_logits: Optional[Callable] = None) -> None:
    was_training = model.training
    model.eval()
    try:
        for x, y, keep in batches:
            with autocast():
                output = model(resize_input(x, input_size))
            if keep:
                evaluator.update(output[:keep], y[:keep])
                if on_logits is not None:
                    on_logits(output[:keep], y[:keep])
            _report(progress, 1)
    finally:
        model.train(was_training)


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, device: torch.device,
             autocast: Callable[[], ContextManager] = nullcontext, channels_last: bool = False,
             distributed: bool = False, max_samples: Optional[int] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) of `model` in eval mode over `loader`.

    `max_samples` drops the padding a distributed sampler adds, counted per rank in order.
    """
    evaluator = _evaluator(torch.device(device))
    _evaluate_loader(model, evaluator, _counted(loader, device, channels_last, max_samples), autocast)
    metrics = evaluator.compute(distributed=distributed)
    return {k: metrics[k] for k in ('loss', 'top1', 'top5')}


def space_plans(stages: Sequence[Stage], space: Union[str, Mapping] = 'default') -> List[SubnetPlan]:
    """Every member of the ordered space, the full network included, in depth-first order
    (lexicographic in the stage depths, stage 1 first)."""
    max_drop = resolve_sample_space(space, stages)
    ranges = [range(d - m, d + 1) for d, m in zip(stage_depths(stages), max_drop)]
    return [SubnetPlan.prefix(depths) for depths in itertools.product(*ranges)]


def subnet_plans(stages: Sequence[Stage], space: Union[str, Mapping] = 'default', count: Optional[int] = None,
                 seed: int = 0) -> List[SubnetPlan]:
    """The networks an evaluation reports: the full network first, then `count` distinct other members
    of the space drawn with `seed` (all of them when `count` is None or covers the space), in space
    order. The same plans for every model with this stage layout, so CT and ST twins, and every
    source of one analysis, are evaluated on identical sub-networks; a draw of N + 1 extends the draw of N."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f'subnet_plans: count must be None or an integer >= 0, got {count!r}')
    members = space_plans(stages, space)
    full, others = members[-1], members[:-1]
    if count is not None and count < len(others):
        picks = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:count]
        others = [others[i] for i in sorted(picks.tolist())]
    return [full] + others


def subnet_statistics(full_top1: float, subnet_top1: Sequence[float]) -> Dict[str, Optional[float]]:
    """Full top-1, sub-network mean, std (population, over the evaluated members), min, max, and the
    loafing gap (full minus mean)."""
    values = [float(v) for v in subnet_top1]
    if not values:
        return dict(full_top1=full_top1, **dict.fromkeys(('subnet_mean', 'subnet_std', 'subnet_min', 'subnet_max',
                                                           'loafing_gap')))
    mean = statistics.fmean(values)
    return dict(full_top1=full_top1, subnet_mean=mean, subnet_std=statistics.pstdev(values),
                subnet_min=min(values), subnet_max=max(values), loafing_gap=full_top1 - mean)


# ------------------------------------------------------------------------------------------------
# Many networks at once: routes (block order per stage + input size), by tree or one by one.
# ------------------------------------------------------------------------------------------------

_NO_CALIBRATION = 'evaluate_plans: the calibration loader produced no images; give calib_loader some training images'


class SplitMismatch(RuntimeError):
    """The registered `TreeSplit` does not reproduce the model's own forward."""


@contextmanager
def _own_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block the norm layers use new, reset statistics; their own are put back on exit."""
    saved = [(m, dict(m._buffers)) for m in _stat_norms(model)]
    try:
        for m, _ in saved:
            m._buffers.update(fresh_statistics(m))
        yield
    finally:
        for m, buffers in saved:
            m._buffers.update(buffers)


def _check_routes(stages: Sequence[Stage], routes: Sequence[Route]) -> None:
    for blocks, _ in routes:
        if any(len(set(k)) != len(k) for k in blocks):
            raise ValueError(f'route {blocks} runs a block twice')
        _check_plan(stages, SubnetPlan(tuple(tuple(sorted(k)) for k in blocks)))


def _host_batches(batches: Iterable[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """The calibration images kept in host memory (pinned for asynchronous copies to a GPU), so that only
    the batch in use is on the device. A batch already on the GPU is copied out asynchronously (into pinned
    memory, on the current stream, which every later copy back follows): no host-device sync."""
    if device.type != 'cuda':
        return [x.to('cpu') for x in batches]
    return [torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=x.is_cuda) for x in batches]


@torch.no_grad()
def _evaluate_each(model, stages, routes, batches, device, calib, autocast, channels_last, progress, on_logits
                   ) -> List[Any]:
    """The reference: each route on its own, the model's own forward with only its blocks (`run_blocks`). The
    calibration images (the same for every route) stay in host memory and are streamed to the device per batch."""
    calib_images = _host_batches(calib, device) if calib is not None else []
    if calib is not None and not calib_images:
        raise ValueError(_NO_CALIBRATION)
    evaluators = [_evaluator(device) for _ in routes]
    for i, (blocks, size) in enumerate(routes):
        with run_blocks(stages, blocks), (_own_statistics(model) if calib_images else nullcontext()):
            if calib_images:
                with calibration_mode(model) as norms:
                    for k, x in enumerate(calib_images):
                        cumulative_momentum(norms, k)
                        with autocast():
                            model(resize_input(_on_device(x, device, channels_last, non_blocking=True), size))
                        _report(progress, 1)
            _evaluate_loader(model, evaluators[i], batches(), autocast, size, progress,
                             None if on_logits is None else lambda out, y, i=i: on_logits(i, out, y))
    return evaluators


def _verify_split(model, split, stages, x, autocast) -> None:
    """The full network through the split must give the model's own logits."""
    full = (tuple(tuple(range(s.depth)) for s in stages), None)
    runner = TreeRunner(model, split, stages, PrefixTree([full]))
    model.eval()
    with autocast():
        ref = model(x).float()
        got = runner.run_route(0, x).float()
    tol = 1e-4 * (1 + ref.abs().max().item())
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-4, atol=tol):
        diff = (got - ref).abs().max().item() if got.shape == ref.shape else f'shape {tuple(got.shape)}'
        raise SplitMismatch(
            f'the tree split of {type(model).__name__} does not reproduce its forward (max difference {diff}); '
            f'its forward_features/forward_head differ from what the split assumes')


@torch.no_grad()
def _evaluate_tree(model, stages, split, routes, batches, device, calib, autocast, progress, on_logits) -> List[Any]:
    runner = TreeRunner(model, split, stages, PrefixTree(routes))
    evaluators = [_evaluator(device) for _ in routes]
    eval_batches = batches()
    if calib is not None:
        calib = iter(calib)
        first = next(calib, None)
        if first is None:
            raise ValueError(_NO_CALIBRATION)
        _verify_split(model, split, stages, first, autocast)
        runner.calibrate(itertools.chain([first], calib), autocast, lambda: _report(progress, len(routes)))
    else:
        first = next(eval_batches, None)
        if first is not None:
            _verify_split(model, split, stages, first[0], autocast)
            eval_batches = itertools.chain([first], eval_batches)
    model.eval()
    with (runner.node_statistics(create=False) if calib is not None else nullcontext()):
        for x, y, keep in eval_batches:
            if keep:
                def on_leaf(ids, logits, y=y[:keep], keep=keep):
                    with torch.autocast(device.type, enabled=False):
                        for i in ids:
                            evaluators[i].update(logits[:keep], y)
                    if on_logits is not None:
                        for i in ids:
                            on_logits(i, logits[:keep], y)

                with autocast():
                    runner.run(x, on_leaf)
            _report(progress, len(routes))
    return evaluators


def evaluate_routes(model: nn.Module, routes: Sequence[Route], loader: Iterable, device: torch.device, *,
                    bn: str = 'running', calib_loader: Optional[Iterable] = None, calib_images: int = CALIB_IMAGES,
                    autocast: Callable[[], ContextManager] = nullcontext, channels_last: bool = False,
                    max_samples: Optional[int] = None, method: str = 'auto', progress: Optional[Any] = None,
                    distributed: bool = False, on_logits: Optional[OnLogits] = None,
                    info: Optional[Dict[str, Any]] = None) -> List[Dict[str, float]]:
    """`evaluate_plans` for routes `(blocks, input_size)`, whose blocks may run in any order (lesions)."""
    if bn not in BN_MODES:
        raise ValueError(f'bn={bn!r}: use one of {list(BN_MODES)}')
    if method not in METHODS:
        raise ValueError(f'method={method!r}: use one of {list(METHODS)}')
    if bn == 'recalibrate' and calib_loader is None:
        raise ValueError("bn='recalibrate' needs calib_loader (training images to re-estimate BatchNorm statistics on)")
    if bn == 'recalibrate' and calib_images < 1:
        raise ValueError(f"bn='recalibrate' needs calib_images >= 1, got {calib_images}")
    device = torch.device(device)
    model = unwrap_model(model)
    stages = subnet_stages(model)
    routes = [(tuple(tuple(k) for k in blocks), size) for blocks, size in routes]
    _check_routes(stages, routes)
    info = {} if info is None else info
    supported, reason = tree_supported(model)
    if method == 'tree' and not supported:
        raise ValueError(f"method='tree': {reason}; use method='each'")
    chosen = 'tree' if method != 'each' and supported else 'each'
    tree_blocks, each_blocks = PrefixTree(routes).block_evaluations()
    info.update(method=chosen, reason=reason if method == 'auto' else f'method={method!r} requested',
                block_evaluations_per_batch=tree_blocks if chosen == 'tree' else each_blocks,
                block_evaluations_each_per_batch=each_blocks)
    if chosen == 'each' and method == 'auto':
        _logger.info(f'Evaluating {len(routes)} sub-networks one by one: {reason}')

    def calib(where: Optional[torch.device], channels_last: bool):
        return calibration_batches(calib_loader, calib_images, where, channels_last) if bn == 'recalibrate' else None

    def batches() -> Iterator:  # the loader's iterator is made (drawing its seed) when this is called
        return _counted(iter(loader), device, channels_last, max_samples)

    with _all_modes_kept(model), eager_blocks(model):  # blocks compiled in place would add graphs (module docstring)
        if chosen == 'tree':
            try:
                evaluators = _evaluate_tree(model, stages, tree_split(model), routes, batches, device,
                                            calib(device, channels_last), autocast, progress, on_logits)
            except SplitMismatch as e:
                if method == 'tree':
                    raise
                _logger.warning(f'{e}; evaluating one by one instead')
                info.update(method='each', reason=str(e), block_evaluations_per_batch=each_blocks)
                chosen = 'each'
        if chosen == 'each':
            evaluators = _evaluate_each(model, stages, routes, batches, device, calib(None, False),  # kept on the host
                                        autocast, channels_last, progress, on_logits)
    return _results(evaluators, distributed)


def evaluate_plans(model: nn.Module, plans: Sequence[SubnetPlan], loader: Iterable, device: torch.device,
                   **options: Any) -> List[Dict[str, Any]]:
    """Accuracy of every plan: `[{'depths', 'top1', 'top5', 'loss', 'samples'}]`, in plan order.

    Keyword options (those of `evaluate_routes`):

    bn: 'running' evaluates with the model's running statistics (eval mode); 'recalibrate' first
    re-estimates each sub-network's own BatchNorm statistics on `calib_images` images of
    `calib_loader` (whole batches, the same images for every sub-network; norm layers in train
    mode with an equal-weight average over batches, every other module in eval mode).
    method: 'tree' (prefix tree), 'each' (one by one with `use_subnet`, the reference), 'auto'
    (tree when the model has a tree split, else each, logged). Both give the same numbers.
    progress: a callable or tqdm-like `update(n)`, told of every unit done; one unit is one
    sub-network on one batch, so the total is `len(plans) * (len(loader) + calibration batches)`.
    distributed: sum the counts over ranks (every rank evaluates every plan on its shard).
    on_logits: called as `on_logits(plan_index, logits, targets)` for every counted batch of every plan.
    info: a dict, filled with how the evaluation ran: 'method' ('tree' or 'each'), 'reason' (a line),
    'block_evaluations_per_batch' (blocks run per batch by that method) and
    'block_evaluations_each_per_batch' (what one by one runs).
    The model's parameters, buffers and train/eval flags are unchanged afterwards, also on error.
    """
    results = evaluate_routes(model, [(plan.blocks, plan.input_size) for plan in plans], loader, device, **options)
    return [{'depths': list(plan.depths), **r} for plan, r in zip(plans, results)]


@torch.no_grad()
def relative_flops(model: nn.Module, plans: Sequence[SubnetPlan], input_size: Sequence[int]) -> List[float]:
    """FLOPs of each plan relative to the full network at `input_size` (C, H, W), batch of 1.

    One counted forward per distinct input size: every block's FLOPs are counted once
    (`torch.utils.flop_counter`), and a plan costs the full network minus its skipped blocks
    (a skippable block keeps the shape, so the others do not change).
    """
    model = unwrap_model(model)
    stages = subnet_stages(model)
    for plan in plans:
        _check_plan(stages, plan)
    channels, height, width = input_size
    param = next(itertools.chain(model.parameters(), model.buffers()))

    @functools.lru_cache(maxsize=None)
    def count(hw):
        """Total FLOPs at input size `hw`, and those of every block `(stage, index)`."""
        counter = FlopCounterMode(display=False)
        per_block, start, handles = {}, {}, []
        for s, stage in enumerate(stages):
            for b, block in enumerate(stage.container._modules.values()):
                handles.append(block.register_forward_pre_hook(
                    lambda m, a, key=(s, b): start.__setitem__(key, counter.get_total_flops())))
                handles.append(block.register_forward_hook(
                    lambda m, a, o, key=(s, b): per_block.__setitem__(key, counter.get_total_flops() - start[key])))
        try:
            with _all_modes_kept(model), counter:
                model.eval()
                model(torch.zeros(1, channels, *hw, device=param.device, dtype=param.dtype))
        finally:
            for h in handles:
                h.remove()
        return counter.get_total_flops(), per_block

    full_total, _ = count((height, width))
    out = []
    for plan in plans:
        total, per_block = count((height, width) if plan.input_size is None else (plan.input_size, plan.input_size))
        skipped = sum(per_block[(s, b)] for s, (stage, kept) in enumerate(zip(stages, plan.blocks))
                      for b in range(stage.depth) if b not in kept)
        out.append((total - skipped) / full_total)
    return out
