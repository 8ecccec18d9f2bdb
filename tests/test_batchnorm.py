"""BatchNorm in sub-network passes. `bn: freeze` (default): sub-network passes normalise with their own batch
statistics and leave running statistics and `num_batches_tracked` exactly as the main pass left them; `bn: update`:
every pass (main and sub-networks) updates them, in order. Checked layer by layer with forward hooks against the
formulas, with running statistics set far from any batch's so the two normalisations cannot agree by chance;
controls show the checks fail for norm layers in eval mode, for running statistics updated under freeze, and for
statistics frozen under update.
"""
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn as nn

import timm_st.method.task as task_module
from timm_st import StimulativeTask, frozen_running_stats

from conftest import PLANS, FixedSampler, batch, clone

EPS = 1e-5  # BatchNorm2d's default, as in timm's ResNet


class BatchNormLog:
    """Per model pass (counted at the stem's first layer), each BatchNorm's input and output."""

    def __init__(self, model, first_layer):
        self.calls = []  # (pass index, module name, input, output)
        self.passes = -1
        first_layer.register_forward_pre_hook(self._new_pass)
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_hook(self._record(name))

    def _new_pass(self, module, args):
        self.passes += 1

    def _record(self, name):
        def hook(module, args, output):  # clone: the in-place ReLU after the norm overwrites the output
            self.calls.append((self.passes, name, args[0].detach().clone(), output.detach().clone()))
        return hook


def batch_normalized(m, x):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)  # biased, as batch normalisation divides by
    return (x - mean) / (var + EPS).sqrt() * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def running_normalized(m, x, mean, var):
    scale = m.weight / (var + EPS).sqrt()
    return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def _norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _far_running_stats(model):
    """Running statistics no batch of these inputs has (mean 3, variance 40)."""
    with torch.no_grad():
        for m in _norms(model).values():
            m.running_mean.fill_(3.0)
            m.running_var.fill_(40.0)
            m.num_batches_tracked.fill_(7)


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _st_step(model, bn, momentum=0.1):
    for m in _norms(model).values():
        m.momentum = momentum
    _far_running_stats(model)
    log = BatchNormLog(model, model.conv1)
    task = StimulativeTask(model, {'num_subnets': 3, 'bn': bn}, sampler=FixedSampler(PLANS), verbose=False)
    task(*batch())['loss'].backward()
    return log


def check_freeze(model, momentum=0.1):
    main_only = clone(model)
    for m in _norms(main_only).values():
        m.momentum = momentum
    _far_running_stats(main_only)
    with torch.no_grad():
        main_only(batch()[0])  # the main pass alone, train mode
    before = _buffers(main_only)
    log = _st_step(model, 'freeze', momentum)
    norms = _norms(model)
    subnet_calls = [c for c in log.calls if c[0] > 0]
    assert log.passes == 3 and len(subnet_calls) > len(norms), 'sub-network passes not seen'
    for pass_index, name, x, out in subnet_calls:
        m = norms[name]
        torch.testing.assert_close(out, batch_normalized(m, x), rtol=1e-4, atol=1e-4,
                                   msg=lambda msg: f'pass {pass_index} {name}: not batch statistics: {msg}')
        by_running = running_normalized(m, x, m.running_mean, m.running_var)
        assert (by_running - out).abs().max() > 0.1, f'{name}: the two normalisations agree here: the check shows nothing'

    after = _buffers(model)
    for name in before:  # running statistics: the main pass's update, nothing from the sub-networks
        assert torch.equal(after[name], before[name]), name
    assert all(int(m.num_batches_tracked) == 8 for m in norms.values())
    assert all(m.track_running_stats and m.training for m in norms.values())


@pytest.mark.parametrize('momentum', [0.1, None])
def test_bn_freeze_subnets_use_batch_statistics_and_leave_running_stats(resnet, momentum):
    check_freeze(resnet, momentum)


def check_update(model):
    norms = _norms(model)
    log = _st_step(model, 'update')
    seen = {}
    for pass_index, name, x, out in log.calls:
        seen.setdefault(name, []).append(x)
    for name, m in norms.items():
        mean, var = torch.full_like(m.running_mean, 3.0), torch.full_like(m.running_var, 40.0)
        for x in seen[name]:  # every pass that ran this layer, in order, momentum 0.1, unbiased batch variance
            mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
            var = 0.9 * var + 0.1 * x.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-4, atol=1e-5, msg=lambda msg: f'{name}: {msg}')
        torch.testing.assert_close(m.running_var, var, rtol=1e-4, atol=1e-5, msg=lambda msg: f'{name}: {msg}')
        assert int(m.num_batches_tracked) == 7 + len(seen[name]), name
    assert len(seen['bn1']) == 4, 'the stem runs in the main pass and in every sub-network pass'
    assert min(len(v) for v in seen.values()) < 4, 'every layer ran in every pass: the plans skip nothing'


def test_bn_update_every_pass_updates_running_stats(resnet):
    check_update(resnet)


def test_frozen_running_stats_restores_on_error(resnet):
    with pytest.raises(RuntimeError, match='boom'):
        with frozen_running_stats(resnet):
            raise RuntimeError('boom')
    assert all(m.track_running_stats for m in _norms(resnet).values())


# --- controls ------------------------------------------------------------------------------------------------

@contextmanager
def norms_in_eval_mode(model):
    """The wrong variant: running statistics left alone by putting norm layers in eval mode (so they normalise
    with the running statistics, not the batch's)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


FREEZE_MUTATIONS = {
    'norm layers in eval mode': norms_in_eval_mode,
    'running statistics updated': lambda model: nullcontext(),
}


@pytest.mark.parametrize('mutation', list(FREEZE_MUTATIONS))
def test_freeze_check_fails_on_wrong_variant(resnet, monkeypatch, mutation):
    monkeypatch.setattr(task_module, 'frozen_running_stats', FREEZE_MUTATIONS[mutation])
    with pytest.raises(AssertionError):
        check_freeze(resnet)


def test_update_check_fails_when_subnets_leave_stats_alone(resnet, monkeypatch):
    monkeypatch.setattr(StimulativeTask, '_subnet_norm_context', lambda self: frozen_running_stats(self.model))
    with pytest.raises(AssertionError):
        check_update(resnet)
