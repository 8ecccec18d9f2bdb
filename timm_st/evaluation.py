"""Evaluation: full-network accuracy, and accuracy of sampled sub-networks ("loafing")."""
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn
from timm.task import ClassificationEvaluator

from .adapters import Stage, stage_depths, subnet_stages, use_subnet
from .plan import SubnetPlan
from .samplers import OrderedSubnetSampler
from .spaces import resolve_sample_space

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
    """Loss, top-1 and top-5 (percent) of `model` in eval mode over `loader`."""
    evaluator = ClassificationEvaluator(device=device, max_samples=max_samples)
    was_training = model.training
    model.eval()
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = model(x)
            evaluator.update(output, y)
    finally:
        model.train(was_training)
    return dict(evaluator.compute(distributed=distributed))


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
