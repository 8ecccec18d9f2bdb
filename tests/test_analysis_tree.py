"""Sub-network evaluation (`timm_st.analysis.evaluation`, `.tree`).

The reference for every number is the plain model forward under `use_subnet` (after
`recalibrate_bn` under `use_subnet` for re-estimated statistics), computed here on a copy of
the model, never through the prefix tree.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from timm.models.convnext import ConvNeXt
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.resnet import BasicBlock, ResNet

from timm_st import Stage, SubnetPlan, recalibrate_bn, register_subnet_adapter, subnet_stages, use_subnet
from timm_st.analysis.evaluation import (
    SplitMismatch, evaluate_plans, relative_flops, space_plans, subnet_plans,
)
from timm_st.analysis.tree import TreeSplit, recalibrated_statistics, register_tree_split, tree_supported
from timm_st.models.cifar_resnet import CifarResNet

CLASSES = 10  # more than 5: top-5 accuracy is 100% by construction with 5 classes or fewer


def _randomize_norms(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so running and re-estimated statistics differ."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.num_batches_tracked.fill_(7)
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def cifar_resnet():
    torch.manual_seed(0)
    return _randomize_norms(CifarResNet(depths=(3, 3, 2), widths=(4, 8, 8), num_classes=CLASSES)), 8


def timm_resnet():
    torch.manual_seed(0)
    return _randomize_norms(ResNet(BasicBlock, (3, 2, 2, 2), channels=(8, 8, 16, 16), stem_width=8,
                                   num_classes=CLASSES, zero_init_last=False)), 32


def regnet():
    torch.manual_seed(0)
    return _randomize_norms(RegNet(RegNetCfg(depth=8, w0=8, wa=8.0, wm=2.0, group_size=4, stem_width=8),
                                   num_classes=CLASSES)), 32


def convnext():  # stage entries (downsample) between stages; LayerNorm only
    torch.manual_seed(0)
    return ConvNeXt(depths=(2, 2, 3, 2), dims=(8, 8, 16, 16), num_classes=CLASSES).eval(), 32


def loaders(size, n=20, calib_n=20, batch_size=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    cx = 1.5 * torch.randn(calib_n, 3, size, size, generator=g) + 0.3
    cy = torch.zeros(calib_n, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size), DataLoader(TensorDataset(cx, cy), batch_size=batch_size)


def reference_logits(model, plan, loader, bn, calib_loader, calib_images):
    model = copy.deepcopy(model)
    with use_subnet(subnet_stages(model), plan), torch.no_grad():
        if bn == 'recalibrate':
            recalibrate_bn(model, calib_loader, calib_images)
        model.eval()
        return [model(x) for x, _ in loader]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training, getattr(m, 'momentum', None), list(m._modules)) for n, m in model.named_modules()])


def assert_unchanged(model, snap):
    state, modules = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
        assert now[k].dtype == state[k].dtype, k
    assert [(n, m.training, getattr(m, 'momentum', None), list(m._modules))
            for n, m in model.named_modules()] == modules
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize('bn', ['running', 'recalibrate'])
@pytest.mark.parametrize('family', [cifar_resnet, timm_resnet, regnet, convnext])
def test_tree_matches_each_subnet_alone(family, bn):
    model, size = family()
    loader, calib = loaders(size)
    plans = space_plans(subnet_stages(model))
    logits = {}
    info = {}
    snap = snapshot(model)
    results = evaluate_plans(model, plans, loader, 'cpu', bn=bn, calib_loader=calib, calib_images=12, method='tree',
                             on_logits=lambda i, out, y: logits.setdefault(i, []).append(out.clone()), info=info)
    assert_unchanged(model, snap)
    assert info['method'] == 'tree'
    assert info['block_evaluations_per_batch'] < info['block_evaluations_each_per_batch']
    for i, plan in enumerate(plans):
        ref = reference_logits(model, plan, loader, bn, calib, 12)
        assert len(logits[i]) == len(ref)
        for got, want in zip(logits[i], ref):
            assert (got - want).abs().max().item() <= 1e-5
        ref = torch.cat(ref)
        targets = torch.cat([y for _, y in loader])
        assert results[i]['depths'] == list(plan.depths)
        assert results[i]['samples'] == len(targets)
        assert results[i]['top1'] == 100 * ref.argmax(-1).eq(targets).sum().item() / len(targets)
        top5 = 100 * ref.topk(5, -1).indices.eq(targets[:, None]).any(-1).sum().item() / len(targets)
        assert results[i]['top5'] == pytest.approx(top5) and results[i]['top5'] < 100
        assert math.isclose(results[i]['loss'], nn.functional.cross_entropy(ref, targets).item(), rel_tol=1e-5)
    if bn == 'recalibrate' and family is not convnext:  # re-estimation must matter, or the test proves little
        running = evaluate_plans(model, plans[:1], loader, 'cpu')
        assert running[0]['loss'] != results[0]['loss']


@pytest.mark.parametrize('bn', ['running', 'recalibrate'])
def test_each_matches_tree_with_max_samples_and_input_size(bn):
    model, size = timm_resnet()
    loader, calib = loaders(size)
    plans = [SubnetPlan.prefix((3, 1, 2, 1)), SubnetPlan.prefix((2, 2, 1, 2), input_size=24), SubnetPlan.prefix((1, 1, 1, 1))]
    kwargs = dict(bn=bn, calib_loader=calib, calib_images=12, max_samples=13)
    tree = evaluate_plans(model, plans, loader, 'cpu', method='tree', **kwargs)
    each = evaluate_plans(model, plans, loader, 'cpu', method='each', **kwargs)
    assert [r['samples'] for r in tree] == [13] * 3
    for t, e in zip(tree, each):
        assert t['top1'] == e['top1'] and t['top5'] == e['top5']
        assert math.isclose(t['loss'], e['loss'], rel_tol=1e-6)


def test_recalibration_runs_without_drop_path():
    """Statistics are estimated on the network as it is evaluated: drop-path off, so they are
    reproducible and the tree equals one by one also for a model trained with stochastic depth."""
    torch.manual_seed(0)
    model = _randomize_norms(CifarResNet(depths=(3, 3, 2), widths=(4, 8, 8), num_classes=CLASSES, drop_path_rate=0.5))
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if hasattr(m, 'drop_path'):
            m.drop_path = nn.Identity()
    loader, calib = loaders(8)
    plans = space_plans(subnet_stages(model))
    kwargs = dict(bn='recalibrate', calib_loader=calib, calib_images=12)
    tree = evaluate_plans(model, plans, loader, 'cpu', method='tree', **kwargs)
    assert tree == evaluate_plans(model, plans, loader, 'cpu', method='each', **kwargs)
    assert tree == evaluate_plans(plain, plans, loader, 'cpu', method='each', **kwargs)


@pytest.mark.parametrize('family', [cifar_resnet, regnet])
def test_recalibrated_statistics_equal_recalibrating_each_subnet_alone(family):
    model, size = family()
    _, calib = loaders(size)
    plans = space_plans(subnet_stages(model))
    stats = recalibrated_statistics(model, [(p.blocks, None) for p in plans], calib, 'cpu', calib_images=12)
    for plan, got in zip(plans, stats):
        ref = copy.deepcopy(model)
        with use_subnet(subnet_stages(ref), plan):
            recalibrate_bn(ref, calib, 12)
            used = {n: m for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}  # the kept blocks' norms
        assert got.keys() == used.keys()
        for name, m in used.items():
            for key in ('running_mean', 'running_var', 'num_batches_tracked'):
                # bitwise: the same batches through the same ops, averaged by the same BatchNorm update
                assert torch.equal(got[name][key], getattr(m, key)), (plan.depths, name, key)


def _failing_after(module, calls):
    count = [0]

    def hook(m, args, out):
        count[0] += 1
        if count[0] >= calls:
            raise RuntimeError('injected failure')
    return module.register_forward_hook(hook)


@pytest.mark.parametrize('method', ['tree', 'each'])
@pytest.mark.parametrize('bn', ['running', 'recalibrate'])
@pytest.mark.parametrize('calls', [1, 2, 5, 10])  # check, calibration and evaluation passes
def test_model_bit_identical_after_a_failing_forward(method, bn, calls):
    model, size = cifar_resnet()
    loader, calib = loaders(size)
    plans = space_plans(subnet_stages(model))
    snap = snapshot(model)
    handle = _failing_after(model.stages[1][2], calls)
    try:
        with pytest.raises(RuntimeError, match='injected failure'):
            evaluate_plans(model, plans, loader, 'cpu', bn=bn, calib_loader=calib, calib_images=12, method=method)
    finally:
        handle.remove()
    assert_unchanged(model, snap)


def test_train_mode_flags_and_mixed_modes_restored():
    model, size = cifar_resnet()
    model.train()
    model.stages[0][1].bn1.eval()  # a frozen norm layer inside a training model
    loader, calib = loaders(size)
    snap = snapshot(model)
    for method in ('tree', 'each'):
        evaluate_plans(model, space_plans(subnet_stages(model))[:4], loader, 'cpu', bn='recalibrate',
                       calib_loader=calib, calib_images=8, method=method)
        assert_unchanged(model, snap)


def test_progress_counts_one_unit_per_subnet_and_batch():
    model, size = cifar_resnet()
    loader, calib = loaders(size)  # 3 evaluation batches; 12 calibration images = 2 batches of 8
    plans = space_plans(subnet_stages(model))[:5]
    for method in ('tree', 'each'):
        done = []
        evaluate_plans(model, plans, loader, 'cpu', bn='recalibrate', calib_loader=calib, calib_images=12,
                       method=method, progress=done.append)
        assert sum(done) == len(plans) * (3 + 2)


class _Plain(nn.Module):
    """A residual model with an adapter but no tree split."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(3)])
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class _Mismatched(_Plain):
    """Has a split that forgets the stem: the check against the model's own forward must catch it."""


register_subnet_adapter(_Plain, lambda m: [Stage(m.blocks, (False, True, True))])
register_tree_split(_Mismatched, lambda m: TreeSplit(stem=lambda x: x.repeat(1, 2, 1, 1)[:, :4],
                                                     head=lambda x: m.fc(x.mean((2, 3)))))


def test_models_without_a_split_are_evaluated_one_by_one_and_say_so():
    torch.manual_seed(0)
    model = _Plain().eval()
    loader, _ = loaders(8)
    plans = space_plans(subnet_stages(model))
    supported, reason = tree_supported(model)
    assert not supported and 'no tree split for _Plain' in reason
    info = {}
    auto = evaluate_plans(model, plans, loader, 'cpu', info=info)
    assert info['method'] == 'each' and 'no tree split' in info['reason']
    assert info['block_evaluations_per_batch'] == info['block_evaluations_each_per_batch'] == 1 + 2 + 3
    assert auto == evaluate_plans(model, plans, loader, 'cpu', method='each')
    with pytest.raises(ValueError, match="method='tree': no tree split"):
        evaluate_plans(model, plans, loader, 'cpu', method='tree')


def test_a_split_that_does_not_reproduce_the_model_is_caught():
    torch.manual_seed(0)
    model = _Mismatched().eval()
    loader, _ = loaders(8)
    plans = space_plans(subnet_stages(model))
    assert tree_supported(model)[0]
    with pytest.raises(SplitMismatch, match='does not reproduce its forward'):
        evaluate_plans(model, plans, loader, 'cpu', method='tree')
    info = {}
    auto = evaluate_plans(model, plans, loader, 'cpu', info=info)
    assert info['method'] == 'each' and 'does not reproduce' in info['reason']
    assert auto == evaluate_plans(model, plans, loader, 'cpu', method='each')


def test_bad_arguments_fail_before_any_work():
    model, size = cifar_resnet()
    loader, _ = loaders(size)
    plans = space_plans(subnet_stages(model))
    with pytest.raises(ValueError, match='calib_loader'):
        evaluate_plans(model, plans, loader, 'cpu', bn='recalibrate')
    for method in ('tree', 'each'):
        with pytest.raises(ValueError, match='calibration loader produced no images'):
            evaluate_plans(model, plans, loader, 'cpu', bn='recalibrate', calib_loader=[], method=method)
    with pytest.raises(ValueError, match="bn='both'"):
        evaluate_plans(model, plans, loader, 'cpu', bn='both')
    with pytest.raises(ValueError, match='method'):
        evaluate_plans(model, plans, loader, 'cpu', method='fast')
    with pytest.raises(ValueError, match='keeps block 5'):
        evaluate_plans(model, [SubnetPlan.prefix((6, 1, 1))], loader, 'cpu')


def _fake_stages(depths):
    return [Stage(nn.Sequential(*[nn.Identity() for _ in range(d)]), (False,) + (True,) * (d - 1)) for d in depths]


@pytest.mark.parametrize('space, size', [('default', 216), ('space3', 8), ({'min_keep': [3, 2, 2, 1]}, 1 * 3 * 5 * 3)])
def test_space_plans_enumerate_the_whole_space_in_order(space, size):
    stages = _fake_stages((3, 4, 6, 3))
    plans = space_plans(stages, space)
    assert len(plans) == size == len(set(plans))
    assert plans[-1] == SubnetPlan.prefix((3, 4, 6, 3))
    assert [p.depths for p in plans] == sorted(p.depths for p in plans)
    assert all(p == SubnetPlan.prefix(p.depths) for p in plans)


def test_subnet_plans_full_first_then_distinct_draws_from_the_space():
    stages = _fake_stages((3, 4, 6, 3))
    members = space_plans(stages, 'default')
    full = SubnetPlan.prefix((3, 4, 6, 3))
    drawn = subnet_plans(stages, 'default', 20, seed=0)
    assert drawn == subnet_plans(_fake_stages((3, 4, 6, 3)), 'default', 20, seed=0)
    assert drawn[0] == full and full not in drawn[1:]
    assert len(set(drawn)) == 21 and set(drawn) <= set(members)
    assert [p.depths for p in drawn[1:]] == sorted(p.depths for p in drawn[1:])
    assert drawn != subnet_plans(stages, 'default', 20, seed=1)
    assert set(subnet_plans(stages, 'default', 19, seed=0)) < set(drawn)  # a draw of N + 1 extends the draw of N
    assert subnet_plans(stages, 'space5', 20) == [full] + space_plans(stages, 'space5')[:-1]  # fewer than asked
    assert subnet_plans(stages, 'space5') == subnet_plans(stages, 'space5', 2)
    assert subnet_plans(stages, 'default', 0) == [full]
    with pytest.raises(ValueError, match='integer >= 0'):
        subnet_plans(stages, 'default', -1)


def test_relative_flops_match_counting_each_subnet():
    model, size = timm_resnet()
    plans = [SubnetPlan.prefix((3, 2, 2, 2)), SubnetPlan.prefix((1, 1, 1, 1)), SubnetPlan.prefix((2, 2, 1, 2), 24)]

    def flops(plan):
        counter = FlopCounterMode(display=False)
        with use_subnet(subnet_stages(model), plan), counter, torch.no_grad():
            s = plan.input_size or size
            model(torch.zeros(1, 3, s, s))
        return counter.get_total_flops()

    got = relative_flops(model, plans, (3, size, size))
    assert got[0] == 1.0
    assert got == pytest.approx([flops(p) / flops(plans[0]) for p in plans], rel=1e-12)
    assert max(got[1:]) < 1
