"""Evaluation: full-network accuracy, and accuracy of sampled sub-networks ("loafing")."""
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..method.adapters import Stage, stage_depths, subnet_stages, use_subnet
from ..method.plan import SubnetPlan
from ..method.sampling import OrderedSubnetSampler, resolve_sample_space

__all__ = ['validate', 'sample_eval_plans', 'evaluate_subnets']


@torch.no_grad()
def validate(
        model: nn.Module,
        loader: Iterable,
        device: torch.device,
        autocast: Callable[[], ContextManager] = nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
        max_samples: Optional[int] = None,
) -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) of `model` in eval mode over `loader`.

    `max_samples` drops the padding a distributed sampler adds, counted per rank in order.
    """
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, examples, top-1, top-5 correct
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = model(x)
            if max_samples is not None:
                keep = max(0, min(output.shape[0], max_samples - seen))
                output, y = output[:keep], y[:keep]
            seen += output.shape[0]
            if not output.shape[0]:
                continue
            output = output.float()
            correct = output.topk(min(5, output.shape[-1]), dim=-1).indices.eq(y[:, None])
            totals += torch.stack([
                F.cross_entropy(output, y, reduction='sum').double(), torch.tensor(output.shape[0], device=device),
                correct[:, 0].sum(), correct.any(-1).sum()]).double()
    finally:
        model.train(was_training)
    if distributed:
        torch.distributed.all_reduce(totals)
    count = max(totals[1].item(), 1)
    return {'loss': totals[0].item() / count, 'top1': 100 * totals[2].item() / count,
            'top5': 100 * totals[3].item() / count}


def sample_eval_plans(stages: List[Stage], space: Union[str, Mapping] = 'default', count: int = 10,
                      seed: int = 0) -> List[SubnetPlan]:
    """Up to `count` distinct proper sub-networks of an ordered space, the same for every run with
    the same model layout and seed (so CT and ST runs are evaluated on the same sub-networks)."""
    max_drop = resolve_sample_space(space, stages)
    depths = stage_depths(stages)
    sampler = OrderedSubnetSampler(depths, max_drop, seed=seed)
    size = 1
    for m in max_drop:
        size *= m + 1
    plans, full = [], SubnetPlan.prefix(depths)
    target = min(count, size - 1)
    for _ in range(100 * max(count, 1)):
        if len(plans) >= target:
            break
        plan = sampler.sample()
        if plan != full and plan not in plans:
            plans.append(plan)
    return sorted(plans, key=lambda p: p.depths)


def evaluate_subnets(model: nn.Module, plans: List[SubnetPlan], loader: Iterable, device: torch.device,
                     **validate_kwargs) -> Dict[str, object]:
    """Top-1 of each plan with the full network's BN statistics (eval mode), and its summary."""
    stages = subnet_stages(model)
    per_plan = []
    for plan in plans:
        with use_subnet(stages, plan):
            metrics = validate(model, loader, device, **validate_kwargs)
        per_plan.append({'depths': list(plan.depths), 'top1': metrics['top1'], 'top5': metrics['top5']})
    top1 = torch.tensor([p['top1'] for p in per_plan], dtype=torch.float64)
    summary = {'count': len(per_plan)}
    if per_plan:
        summary.update(
            top1_mean=top1.mean().item(), top1_std=top1.std(unbiased=False).item(),
            top1_min=top1.min().item(), top1_max=top1.max().item())
    summary['subnets'] = per_plan
    return summary
