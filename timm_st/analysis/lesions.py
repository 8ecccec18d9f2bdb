"""Lesion study (Veit et al., "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks", NeurIPS 2016): how accuracy degrades when residual blocks are removed or reordered.

A network that "loafs" leans on a few blocks, so removing one costs a lot; one trained to work
at every depth degrades gracefully. All lesioned networks are evaluated together, as one prefix
tree when the model has a tree split (`evaluate_routes`), with the model's running statistics.
"""
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ..method.adapters import subnet_stages
from .evaluation import evaluate_routes

__all__ = ['lesion_study']


def lesion_study(model: nn.Module, loader: Iterable, device: torch.device, *, max_removed: Optional[int] = None,
                 draws: int = 5, seed: int = 0, autocast: Callable[[], ContextManager] = nullcontext,
                 channels_last: bool = False, max_samples: Optional[int] = None, progress: Optional[Any] = None,
                 method: str = 'auto', info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Top-1 of the model with its droppable blocks (`Stage.droppable`) removed or swapped.

    Returns `{'full': top1,
    'single': [{'stage', 'block', 'top1'}] (each droppable block removed alone),
    'random': [{'k', 'top1_mean', 'top1_std', 'draws': [{'removed': [[stage, block], ...], 'top1'}]}]
    (k = 1..max_removed random droppable blocks removed, `draws` draws each from a generator seeded
    with `seed`; std over the draws, population), 'swap': [{'stage', 'blocks': [i, i + 1], 'top1'}]
    (every pair of adjacent droppable blocks of a stage, which have the same shape, run in swapped order)}`.
    `max_removed` defaults to every droppable block. `progress`, `method` and `info` as in
    `evaluate_plans`; one unit is one lesioned network on one batch. The model is unchanged afterwards.
    """
    stages = subnet_stages(model)
    droppable = [(s, b) for s, stage in enumerate(stages) for b, d in enumerate(stage.droppable) if d]
    if not droppable:
        raise ValueError(f'lesion_study: {type(model).__name__} has no droppable block (none with an identity skip)')
    max_removed = len(droppable) if max_removed is None else max_removed
    if not 1 <= max_removed <= len(droppable):
        raise ValueError(f'lesion_study: max_removed must be in 1..{len(droppable)} (the droppable blocks), '
                         f'got {max_removed}')
    if draws < 1:
        raise ValueError(f'lesion_study: draws must be >= 1, got {draws}')

    full = tuple(tuple(range(stage.depth)) for stage in stages)

    def without(removed) -> tuple:
        return tuple(tuple(b for b in kept if (s, b) not in removed) for s, kept in enumerate(full))

    routes = [full] + [without({sb}) for sb in droppable]  # each droppable block removed alone
    generator = torch.Generator().manual_seed(seed)
    random_draws = []
    for k in range(1, max_removed + 1):
        for _ in range(draws):
            picks = torch.randperm(len(droppable), generator=generator)[:k].tolist()
            removed = sorted(droppable[i] for i in picks)
            random_draws.append((k, removed))
            routes.append(without(set(removed)))
    swaps = [(s, b) for s, b in droppable if (s, b + 1) in droppable]
    for s, b in swaps:
        order = list(full[s])
        order[b], order[b + 1] = order[b + 1], order[b]
        routes.append(tuple(tuple(order) if i == s else kept for i, kept in enumerate(full)))

    at = iter([r['top1'] for r in evaluate_routes(
        model, [(r, None) for r in routes], loader, device, autocast=autocast, channels_last=channels_last,
        max_samples=max_samples, method=method, progress=progress, info=info)])
    result: Dict[str, Any] = {'full': next(at)}
    result['single'] = [{'stage': s, 'block': b, 'top1': next(at)} for s, b in droppable]
    by_k: Dict[int, List[dict]] = {}
    for k, removed in random_draws:
        by_k.setdefault(k, []).append({'removed': [list(sb) for sb in removed], 'top1': next(at)})
    result['random'] = []
    for k, entries in by_k.items():
        values = torch.tensor([e['top1'] for e in entries], dtype=torch.float64)
        result['random'].append({'k': k, 'top1_mean': values.mean().item(),
                                 'top1_std': values.std(unbiased=False).item(), 'draws': entries})
    result['swap'] = [{'stage': s, 'blocks': [b, b + 1], 'top1': next(at)} for s, b in swaps]
    return result
