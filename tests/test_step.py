"""The ST step: exact gradients, memory order, common-training parity, resume, EMA.

Gradients are compared with `st_reference.reference_step`, written without the code under test (sub-networks
built by hand, hand-written loss formulas, its own resize and BatchNorm handling), on a model whose residual
branches are active, with a check that the compared gradients are not trivially zero and that sub-networks differ
from the full network; controls apply known wrong variants and show the comparison fails.
"""
import math
import weakref
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from timm.task import ClassificationTask, resume_task_checkpoint

import timm_st.method.task as task_module
from timm_st import StimulativeTask, SubnetPlan, recalibrate_bn, resize_input, subnet_stages, use_subnet
from timm_st.method import losses

from conftest import (
    PLANS, FixedSampler, assert_grads_close, assert_nontrivial_grads, assert_subnets_differ, batch, clone, grads,
)
from st_reference import reference_step
from test_batchnorm import norms_in_eval_mode


def task_step(task, batches, scale=1.0, accum=1):
    """timm's loop: task(x, y), in-place division by accumulation steps, scaled backward."""
    sub_losses = []
    for x, y in batches:
        loss = task(x, y)['loss']
        if accum > 1:
            loss /= accum
        (loss * scale).backward()
        sub_losses.append(task.subnet_loss)
    return sub_losses


LOSS_CONFIGS = [
    {'loss': 'kl'},
    {'loss': 'kl', 'temperature': 3.0},
    {'loss': 'kl_direction', 'temperature': 2.0, 'amplitude': 3.0},
    {'loss': 'kl_direction', 'norm': 'l2', 'amplitude': 4.0},
    {'loss': 'soft_ce', 'temperature': 2.0},
    {'loss': 'mse', 'temperature': 2.0},
    {'loss': 'dkd', 'temperature': 2.0},
    {'loss': 'kl', 'bn': 'update'},
]


def check_step(model, extra):
    """Two micro-batches of gradient accumulation (2 steps of 3 sub-networks, loss scale 1024): the task's
    gradients, sub-network losses and buffers equal the hand-built reference's, and the comparison has signal."""
    config = {'num_subnets': 3, 'coef': 0.7, **extra}
    ref_model = clone(model)
    batches = [batch(seed=1), batch(seed=2)]
    assert_subnets_differ(ref_model, PLANS, batches[0][0])
    task = StimulativeTask(model, config, sampler=FixedSampler(PLANS), verbose=False)
    sub_losses = task_step(task, batches, scale=1024.0, accum=2)
    ref_losses = reference_step(ref_model, config, PLANS, batches, scale=1024.0, accum=2)
    assert_nontrivial_grads(grads(ref_model))
    assert_grads_close(grads(model), grads(ref_model), rel=1e-5)
    torch.testing.assert_close(sub_losses[-1], ref_losses[3:].mean())
    # both runs saw the same main-pass BN updates only
    for (name, got), want in zip(model.named_buffers(), ref_model.buffers()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize('extra', LOSS_CONFIGS, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_gradients_equal_summed_loss(resnet, extra):
    check_step(resnet, extra)


@contextmanager
def _residual_grads_x5(stages, plan):
    """use_subnet, and the sub-network's gradients of every residual branch (block parameters but the
    projection shortcut) multiplied by 5."""
    params = [p for stage in stages for block in stage.container.children()
              for name, p in block.named_parameters() if not name.startswith('downsample')]
    handles = [p.register_hook(lambda g: 5 * g) for p in params]
    try:
        with use_subnet(stages, plan):
            yield
    finally:
        for h in handles:
            h.remove()


def _wrong_loss(name, wrong):
    spec = losses.get_subnet_loss(name)
    return losses.SubnetLoss(wrong(spec.fn), spec.normalized_logits, spec.hard_labels)


# name -> (step config, what the control patches: (object, attribute, wrong value builder))
STEP_MUTATIONS = {
    'residual branch gradients x5': ({'loss': 'kl'}, (task_module, 'use_subnet', lambda orig: _residual_grads_x5)),
    'kl reversed': ({'loss': 'kl', 'temperature': 3.0}, (losses._LOSSES, 'kl', lambda orig: _wrong_loss(
        'kl', lambda fn: lambda s, t, y, T: fn(t, s, y, T)))),
    'kl without T^2': ({'loss': 'kl', 'temperature': 3.0}, (losses._LOSSES, 'kl', lambda orig: _wrong_loss(
        'kl', lambda fn: lambda s, t, y, T: fn(s, t, y, T) / T ** 2))),
    'amplitude ignored': ({'loss': 'kl_direction', 'norm': 'l2', 'amplitude': 4.0},
                          (task_module, 'normalize_logits', lambda orig: lambda z, norm, a: orig(z, norm, 1.0))),
    'sub-network = full network': ({'loss': 'kl'},
                                   (task_module, 'use_subnet', lambda orig: lambda s, p: nullcontext())),
    'inputs not resized': ({'loss': 'kl'}, (task_module, 'resize_input', lambda orig: lambda x, size: x)),
    'norm layers in eval mode in sub-networks': ({'loss': 'kl'},
                                                 (task_module, 'frozen_running_stats', lambda orig: norms_in_eval_mode)),
}


@pytest.mark.parametrize('mutation', list(STEP_MUTATIONS))
def test_gradient_check_fails_on_wrong_step(resnet, monkeypatch, mutation):
    """Controls: each known wrong variant of the step makes `check_step`'s gradient comparison fail."""
    extra, (target, attr, wrong) = STEP_MUTATIONS[mutation]
    if isinstance(target, dict):
        monkeypatch.setitem(target, attr, wrong(target[attr]))
    else:
        monkeypatch.setattr(target, attr, wrong(getattr(target, attr)))
    with pytest.raises(AssertionError, match='relative error'):
        check_step(resnet, extra)


def test_gradients_bf16_autocast(resnet):
    """bf16 rounding makes per-tensor comparisons noisy (fp32-level differences in the loss flip bf16 roundings,
    ~3e-2 on the smallest BatchNorm gradients), so all gradients are compared as one vector: 1.2e-2 here, 0.55
    with the residual branches' sub-network gradients x5."""
    config = {'num_subnets': 2, 'loss': 'kl_direction'}
    ref_model = clone(resnet)
    batches = [batch()]
    task = StimulativeTask(resnet, config, sampler=FixedSampler(PLANS), verbose=False)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        result = task(*batches[0])
    assert result['output'].dtype == torch.bfloat16
    result['loss'].backward()  # the loop's backward runs outside autocast; sub-networks re-enter it
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference_step(ref_model, config, PLANS, batches)
    got, want = grads(resnet), grads(ref_model)
    assert_nontrivial_grads(want)
    assert got.keys() == want.keys()
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    error = diff.norm() / torch.cat([w.flatten() for w in want.values()]).norm()
    assert error < 3e-2


def test_subnets_run_in_captured_autocast_state(resnet):
    seen = []
    resnet.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    task = StimulativeTask(resnet, {'num_subnets': 2}, sampler=FixedSampler(PLANS), verbose=False)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = task(*batch())['loss']
    loss.backward()
    assert seen == [torch.bfloat16] * 3


class SavedTensorTracker:
    """Tracks, per model pass, the saved activations autograd holds, via saved-tensor hooks."""

    class Box:
        def __init__(self, t):
            self.t = t

    def __init__(self, model):
        self.passes = []  # one list of weakrefs per model call
        self.violations = []
        model.register_forward_pre_hook(self._on_pass)

    def _on_pass(self, module, args):
        alive = [i for i, refs in enumerate(self.passes) if any(r() is not None for r in refs)]
        if alive:
            self.violations.append((len(self.passes), alive))
        self.passes.append([])

    def pack(self, t):
        box = self.Box(t)
        if self.passes:
            self.passes[-1].append(weakref.ref(box))
        return box

    @staticmethod
    def unpack(box):
        return box.t


def test_main_graph_freed_before_subnets_and_one_subnet_graph_at_a_time(resnet):
    task = StimulativeTask(resnet, {'num_subnets': 3}, sampler=FixedSampler(PLANS), verbose=False)
    tracker = SavedTensorTracker(resnet)
    x, y = batch()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = task(x, y)['loss']
        assert len(tracker.passes) == 1 and tracker.passes[0], 'main pass saved no activations?'
        loss.backward()
    assert len(tracker.passes) == 4
    assert all(tracker.passes), 'a sub-network pass saved no activations (not tracked)'
    assert tracker.violations == []


def test_summed_loss_keeps_graphs_alive_so_tracker_can_fail(resnet):
    """The tracker above does detect a design that keeps the main graph alive."""
    tracker = SavedTensorTracker(resnet)
    x, y = batch()
    stages = subnet_stages(resnet)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        total = F.cross_entropy(resnet(x), y)
        with use_subnet(stages, PLANS[0]):
            total = total + resnet(x).sum()
    assert tracker.violations == [(1, [0])]


def _running_stats(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize('config,epoch', [
    ({'num_subnets': 0}, 0),
    ({'num_subnets': 2, 'coef': 0.0}, 0),
    ({'num_subnets': 2, 'start_epoch': 3}, 2),
    ({'num_subnets': 2, 'coef_schedule': 'cosine_up'}, 0),
])
def test_common_training_equals_classification_task(resnet, config, epoch):
    ct_model = clone(resnet)
    calls = []
    resnet.register_forward_pre_hook(lambda m, a: calls.append(1))
    x, y = batch()
    st = StimulativeTask(resnet, config, num_epochs=10, verbose=False)
    st.set_epoch(epoch)
    st_loss = st(x, y)['loss']
    st_loss.backward()
    ct_loss = ClassificationTask(ct_model, torch.nn.CrossEntropyLoss(), verbose=False)(x, y)['loss']
    ct_loss.backward()
    assert len(calls) == 1 and st.subnet_loss is None
    assert torch.equal(st_loss, ct_loss)
    for (n, a), b in zip(resnet.named_parameters(), ct_model.parameters()):
        assert torch.equal(a.grad, b.grad), n
    if st.sampler is not None:
        assert torch.equal(st.sampler.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_coef_schedules():
    from timm_st import StimulativeConfig
    up = StimulativeConfig.from_dict({'coef': 2.0, 'coef_schedule': 'cosine_up'})
    down = StimulativeConfig.from_dict({'coef': 2.0, 'coef_schedule': 'cosine_down'})
    late = StimulativeConfig.from_dict({'coef': 2.0, 'start_epoch': 5})
    assert up.coef_at(0, 10) == 0.0 and up.coef_at(5, 10) == pytest.approx(1.0) and up.coef_at(10, 10) == 2.0
    assert down.coef_at(0, 10) == 2.0 and down.coef_at(3, 10) == pytest.approx(2.0 - 2.0 * (1 - math.cos(0.3 * math.pi)) / 2)
    assert late.coef_at(4, 10) == 0.0 and late.coef_at(5, 10) == 2.0


def test_coef_scales_subnet_gradients(resnet):
    """With a cosine schedule the epoch's coefficient multiplies the sub-network gradients."""
    ref_model = clone(resnet)
    batches = [batch()]
    task = StimulativeTask(resnet, {'num_subnets': 1, 'coef': 2.0, 'coef_schedule': 'cosine_up'},
                           sampler=FixedSampler(PLANS[:1]), num_epochs=4, verbose=False)
    task.set_epoch(1)
    task_step(task, batches)
    reference_step(ref_model, {'num_subnets': 1}, PLANS[:1], batches, coef=2.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert_nontrivial_grads(grads(ref_model))
    assert_grads_close(grads(resnet), grads(ref_model), rel=1e-5)


def test_channels_last_and_grad_checkpointing_match_reference(resnet):
    """In float64: channels-last convolutions round differently in fp32 (relative gradient differences ~1e-2 on
    some BatchNorm biases of this model), which would hide an error of that size."""
    config = {'num_subnets': 2}
    resnet = resnet.double()
    ref_model = clone(resnet)
    resnet = resnet.to(memory_format=torch.channels_last)
    resnet.set_grad_checkpointing(True)
    x, y = batch()
    x = x.double()
    task = StimulativeTask(resnet, config, sampler=FixedSampler(PLANS), verbose=False)
    task(x.contiguous(memory_format=torch.channels_last), y)['loss'].backward()
    reference_step(ref_model, config, PLANS, [(x, y)])
    assert_nontrivial_grads(grads(ref_model))
    assert_grads_close(grads(resnet), grads(ref_model), rel=1e-5)


def test_resize_keeps_channels_last_and_uses_original_batch():
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    out = resize_input(x, 17)
    assert out.shape == (2, 3, 17, 17) and out.is_contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x, size=(17, 17), mode='bilinear', align_corners=False, antialias=True)
    assert torch.equal(out, expected)
    assert resize_input(x, 40) is x and resize_input(x, None) is x


def test_subnet_inputs_resized_from_original_batch(resnet):
    seen = []
    resnet.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    plans = [SubnetPlan.prefix((1, 1, 1, 1), input_size=40), SubnetPlan.prefix((1, 1, 1, 1), input_size=24)]
    task = StimulativeTask(resnet, {'num_subnets': 2}, sampler=FixedSampler(plans), verbose=False)
    x, y = batch()
    task(x, y)['loss'].backward()
    for got, size in zip(seen[1:], (40, 24)):
        assert torch.equal(got, F.interpolate(x, size=(size, size), mode='bilinear', antialias=True))


def test_exception_in_subnet_pass_restores_model(resnet):
    task = StimulativeTask(resnet, {'num_subnets': 1}, sampler=FixedSampler(PLANS), verbose=False)
    modules_before = [dict(s.container._modules) for s in task.stages]
    armed = []

    def boom(*args):
        if armed:
            raise RuntimeError('boom')

    resnet.layer4[0].register_forward_hook(boom)
    loss = task(*batch())['loss']
    armed.append(True)  # the sub-network pass (inside backward) raises
    with pytest.raises(RuntimeError, match='boom'):
        loss.backward()
    assert [dict(s.container._modules) for s in task.stages] == modules_before
    assert all(m.track_running_stats for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_resume_continues_the_plan_sequence(resnet, tmp_path):
    config = {'num_subnets': 2, 'input_scale': [0.5, 1.0], 'seed': 3}
    full = StimulativeTask(clone(resnet), config, verbose=False)
    plans_full = [full.sampler.sample(input_height=64) for _ in range(8)]

    first = StimulativeTask(clone(resnet), config, verbose=False)
    for _ in range(2):
        first(*batch())['loss'].backward()
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({'epoch': 0, 'version': 2, **first.get_checkpoint_state()}, path)

    resumed = StimulativeTask(clone(resnet), config, verbose=False)
    assert resume_task_checkpoint(resumed, str(path), log_info=False) == 1
    assert [resumed.sampler.sample(input_height=64) for _ in range(4)] == plans_full[4:]


def test_ema_updates_and_checkpoints(resnet):
    task = StimulativeTask(resnet, {'num_subnets': 1}, verbose=False)
    ema = task.setup_ema(decay=0.5)
    before = ema.module.fc.weight.detach().clone()
    opt = torch.optim.SGD(resnet.parameters(), lr=0.5)
    task(*batch())['loss'].backward()
    opt.step()
    task.update_ema(step=5)  # past ModelEmaV3.update_after_step, so decay 0.5 applies
    torch.testing.assert_close(ema.module.fc.weight, 0.5 * before + 0.5 * resnet.fc.weight.detach())
    state = task.get_checkpoint_state(ema=True)
    assert state['state_dict_ema'].keys() == resnet.state_dict().keys() and 'task_state_ema' not in state
    assert task.get_checkpoint_state()['state_dict'].keys() == resnet.state_dict().keys()


def test_dkd_rejects_soft_targets(resnet):
    task = StimulativeTask(resnet, {'loss': 'dkd'}, verbose=False)
    x, _ = batch()
    loss = task(x, torch.softmax(torch.randn(4, 7), -1))['loss']
    with pytest.raises(ValueError, match="'dkd' needs class-index targets"):
        loss.backward()


def test_recalibrate_bn_averages_batch_statistics(resnet):
    batches = [batch(seed=s)[0] for s in range(3)]
    feats = [resnet.conv1(x).detach() for x in batches[:2]]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    resnet.eval()
    momentum = resnet.bn1.momentum
    seen = recalibrate_bn(resnet, [(x, None) for x in batches], num_images=8)
    assert seen == 8 and not resnet.training and resnet.bn1.momentum == momentum
    torch.testing.assert_close(resnet.bn1.running_mean, expected_mean)
    torch.testing.assert_close(resnet.bn1.running_var, expected_var)


def test_recalibrate_bn_empty_loader_keeps_statistics(resnet):
    before = _running_stats(resnet)
    with pytest.raises(ValueError, match='no images'):
        recalibrate_bn(resnet, [], num_images=8)
    after = _running_stats(resnet)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fp16_autocast_with_timm_native_scaler(resnet):
    """fp16 through timm's NativeScaler untouched: the sub-network gradients carry the loss scale."""
    from timm.utils import NativeScaler
    config = {'num_subnets': 2}
    ref_model = clone(resnet)
    batches = [batch()]
    task = StimulativeTask(resnet, config, sampler=FixedSampler(PLANS), verbose=False)
    scaler = NativeScaler(device='cpu')
    scaler._scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)  # 2**16 overflows this tiny fp16 model
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1)
    with torch.autocast('cpu', dtype=torch.float16):
        loss = task(*batches[0])['loss']
    scaler(loss, optimizer, need_update=False)  # the loop's backward on an accumulation micro-step
    scale = scaler._scaler.get_scale()
    assert scale == 1024.0
    with torch.autocast('cpu', dtype=torch.float16):  # the summed loss in the same precision, same scale
        reference_step(ref_model, config, PLANS, batches, scale=scale)
    assert_nontrivial_grads(grads(ref_model))
    assert_grads_close(grads(resnet), grads(ref_model), rel=2e-3)
