"""An independent reference of the ST step, written from the published definitions, never from the package:
the sub-network losses with explicit exps, logs and sums (no `F.kl_div`, no `F.layer_norm`), the logit
normalisation of KL-, and a step that builds each sub-network by hand (`conftest.subnet_forward`: its own resize,
stem, the kept blocks by indexing each stage, head) with its own BatchNorm handling (running statistics saved
and restored around the sub-network passes, so they normalise with batch statistics and leave no trace).

The definitions (student s = sub-network logits, teacher t = detached full-network logits, T = temperature,
every loss averaged over the batch):
- kl: T^2 * KL(softmax(t/T) || softmax(s/T)) = T^2 * sum_c p_t,c (log p_t,c - log p_s,c);
- kl_direction (the paper's KL-): kl on A * layer_norm(z) of both (over classes, no affine, eps 1e-7), or
  A * z / max(||z||, 1e-7) with norm l2; the main criterion also sees the normalised logits;
- soft_ce: T^2 * cross-entropy of softmax(s/T) against the teacher's softmax(t/T);
- mse: mean over batch and classes of (softmax(s/T) - softmax(t/T))^2 (no T^2);
- dkd (Zhao et al. 2022, alpha = beta = 1): T^2 * (TCKD + NCKD); TCKD = KL between the binary
  (target, non-target) probabilities of teacher and student, NCKD = KL between the teacher's and the student's
  distributions over the non-target classes alone.
"""
import torch
import torch.nn.functional as F

from conftest import restored_buffers, subnet_forward


def log_softmax(z):
    shifted = z - z.max(-1, keepdim=True).values
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def softmax(z):
    return log_softmax(z).exp()


def layer_norm(z, eps=1e-7):
    mean = z.sum(-1, keepdim=True) / z.shape[-1]
    var = ((z - mean) ** 2).sum(-1, keepdim=True) / z.shape[-1]  # biased, as layer norm
    return (z - mean) / (var + eps).sqrt()


def l2_normalize(z, eps=1e-7):
    return z / (z * z).sum(-1, keepdim=True).sqrt().clamp_min(eps)


def normalize(z, norm='layernorm', amplitude=1.0):
    return amplitude * (layer_norm(z) if norm == 'layernorm' else l2_normalize(z))


def kl(student, teacher, target, temperature):
    log_ps, log_pt = log_softmax(student / temperature), log_softmax(teacher / temperature)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature ** 2


def soft_ce(student, teacher, target, temperature):
    log_ps, pt = log_softmax(student / temperature), softmax(teacher / temperature)
    return -(pt * log_ps).sum(-1).mean() * temperature ** 2


def mse(student, teacher, target, temperature):
    return ((softmax(student / temperature) - softmax(teacher / temperature)) ** 2).mean()


def _without_target(z, target):
    """The logits of the non-target classes: (B, C) -> (B, C - 1)."""
    keep = torch.ones_like(z, dtype=torch.bool)
    keep[torch.arange(z.shape[0]), target] = False
    return z[keep].view(z.shape[0], z.shape[1] - 1)


def dkd(student, teacher, target, temperature):
    rows = torch.arange(student.shape[0])
    ps, pt = softmax(student / temperature), softmax(teacher / temperature)
    ps_gt, pt_gt = ps[rows, target], pt[rows, target]
    tckd = (pt_gt * (pt_gt.log() - ps_gt.log()) + (1 - pt_gt) * ((1 - pt_gt).log() - (1 - ps_gt).log())).mean()
    log_qs = log_softmax(_without_target(student, target) / temperature)
    log_qt = log_softmax(_without_target(teacher, target) / temperature)
    nckd = (log_qt.exp() * (log_qt - log_qs)).sum(-1).mean()
    return (tckd + nckd) * temperature ** 2


# name -> (formula, whether student and main logits are normalised first)
LOSSES = {
    'kl': (kl, False),
    'kl_direction': (kl, True),
    'soft_ce': (soft_ce, False),
    'mse': (mse, False),
    'dkd': (dkd, False),
}


def reference_step(model, config, plans, batches, scale=1.0, accum=1, coef=None):
    """Per micro-batch, one backward of (main + coef * sum_i loss_i) / accum * scale, with sub-networks built
    by hand. `plans` are used in order, cycling. Returns the sub-network losses (detached), in order."""
    name = config.get('loss', 'kl')
    formula, normalized = LOSSES[name]
    norm, amplitude = config.get('norm', 'layernorm'), config.get('amplitude', 1.0)
    temperature = config.get('temperature', 1.0)
    coef = config.get('coef', 1.0) if coef is None else coef
    freeze = config.get('bn', 'freeze') == 'freeze'
    device_type = next(model.parameters()).device.type
    plan_iter = iter(list(plans) * len(batches) * config.get('num_subnets', 1))
    losses = []
    for x, y in batches:
        logits = model(x)
        if normalized:
            logits = normalize(logits, norm, amplitude)
        total = F.cross_entropy(logits, y)
        teacher = logits.detach().float()
        for _ in range(config.get('num_subnets', 1)):
            plan = next(plan_iter)
            if freeze:
                with restored_buffers(model):
                    out = subnet_forward(model, plan, x)
            else:
                out = subnet_forward(model, plan, x)
            with torch.autocast(device_type, enabled=False):
                out = out.float()
                if normalized:
                    out = normalize(out, norm, amplitude)
                loss = formula(out, teacher, y, temperature)
            losses.append(loss.detach())
            total = total + coef * loss
        (total / accum * scale).backward()
    return torch.stack(losses)
