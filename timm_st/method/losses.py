"""Sub-network losses (student = sub-network logits, teacher = detached full-network logits).

Every loss is computed in fp32 and reduced to a scalar per batch. The registry lets users add
losses; `kl_direction` (the paper's KL-) is plain KL on logits normalised by `normalize_logits`,
which the task also applies to the main network's logits before its criterion.
"""
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

__all__ = [
    'SubnetLoss', 'register_subnet_loss', 'get_subnet_loss', 'list_subnet_losses', 'normalize_logits',
    'kl_div_loss', 'soft_ce_loss', 'mse_prob_loss', 'dkd_loss',
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class SubnetLoss:
    """A registered loss: `fn(student, teacher, target, temperature) -> scalar`.

    `normalized_logits`: student and main-network logits are passed through `normalize_logits`
    (the main criterion then sees normalised logits too). `hard_labels`: needs class-index
    targets (not mixup/cutmix soft targets).
    """

    fn: LossFn
    normalized_logits: bool = False
    hard_labels: bool = False


_LOSSES: Dict[str, SubnetLoss] = {}


def register_subnet_loss(name: str, fn: LossFn, normalized_logits: bool = False, hard_labels: bool = False) -> None:
    _LOSSES[name] = SubnetLoss(fn, normalized_logits, hard_labels)


def get_subnet_loss(name: str) -> SubnetLoss:
    return _LOSSES[name]


def list_subnet_losses():
    return tuple(_LOSSES)


def normalize_logits(logits: torch.Tensor, norm: str = 'layernorm', amplitude: float = 1.0) -> torch.Tensor:
    """`A * layer_norm(z)` over classes (no affine, eps 1e-7) or `A * z / max(||z||, 1e-7)`."""
    if norm == 'layernorm':
        return amplitude * F.layer_norm(logits, logits.shape[-1:], eps=1e-7)
    if norm == 'l2':
        return amplitude * F.normalize(logits, dim=-1, eps=1e-7)
    raise ValueError(f"norm: unknown normalisation {norm!r}; allowed: 'layernorm', 'l2'")


def kl_div_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
        reduction='batchmean', log_target=True) * (t * t)


def soft_ce_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * cross-entropy of softmax(s/T) against the teacher's probabilities softmax(t/T)."""
    t = temperature
    return -(F.softmax(teacher / t, dim=-1) * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * (t * t)


def mse_prob_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean squared error between softmax(s/T) and softmax(t/T), averaged over all entries."""
    return F.mse_loss(F.softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1))


def dkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022) with alpha = beta = 1: target-class KD + non-target-class KD."""
    if target.ndim != 1 or target.is_floating_point():
        raise ValueError(
            "loss 'dkd' needs class-index targets, got soft targets of shape "
            f"{tuple(target.shape)}; disable mixup/cutmix or choose another loss")
    t = temperature
    gt = F.one_hot(target, student.shape[-1]).to(torch.bool)
    p_s = F.softmax(student / t, dim=-1)
    p_t = F.softmax(teacher / t, dim=-1)
    ps_gt = p_s.masked_fill(~gt, 0).sum(-1, keepdim=True)
    pt_gt = p_t.masked_fill(~gt, 0).sum(-1, keepdim=True)
    b_s = torch.cat([ps_gt, 1 - ps_gt], dim=-1)
    b_t = torch.cat([pt_gt, 1 - pt_gt], dim=-1)
    tckd = F.kl_div(b_s.log(), b_t, reduction='batchmean')
    masked = -1000.0 * gt
    nckd = F.kl_div(
        F.log_softmax(student / t + masked, dim=-1), F.log_softmax(teacher / t + masked, dim=-1),
        reduction='batchmean', log_target=True)
    return (tckd + nckd) * (t * t)


register_subnet_loss('kl', kl_div_loss)
register_subnet_loss('kl_direction', kl_div_loss, normalized_logits=True)
register_subnet_loss('soft_ce', soft_ce_loss)
register_subnet_loss('mse', mse_prob_loss)
register_subnet_loss('dkd', dkd_loss, hard_labels=True)
