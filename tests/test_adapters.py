"""Sub-network adapters and `use_subnet` on every built-in timm family.

Every reduced-plan result is checked against a hand-written forward that calls only the kept
blocks (written from the timm model code, not through the adapter), and the hand-written
forward itself is checked against the model's own forward at full depth.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

import timm
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3

import timm_st
import timm_st.method.adapters
from timm_st import Stage, SubnetPlan, register_subnet_adapter, subnet_stages, use_subnet


# ---------------------------------------------------------------------------------------------
# Hand-written forwards: run only plan.blocks[s] of every stage, straight from the timm code.
# They index the timm modules directly (never the adapter's containers) and must be called
# outside `use_subnet`.
# ---------------------------------------------------------------------------------------------

def _run(blocks, kept, x):
    blocks = list(blocks)
    for i in kept:
        x = blocks[i](x)
    return x


def _manual_resnet(m, x, plan):
    x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    for layer, kept in zip([m.layer1, m.layer2, m.layer3, m.layer4], plan.blocks):
        x = _run(layer.children(), kept, x)
    return m.forward_head(x)


def _manual_regnet(m, x, plan):
    x = m.stem(x)
    for stage, kept in zip([m.s1, m.s2, m.s3, m.s4], plan.blocks):
        x = _run(stage.children(), kept, x)
    return m.forward_head(m.final_conv(x))


def _manual_convnext(m, x, plan):
    x = m.stem(x)
    for stage, kept in zip(m.stages, plan.blocks):
        x = stage.downsample(x)
        x = _run(stage.blocks.children(), kept, x)
    return m.forward_head(m.norm_pre(x))


def _manual_vit(m, x, plan):
    x = m.patch_embed(x)
    x = m._pos_embed(x)
    x = m.patch_drop(x)
    x = m.norm_pre(x)
    (kept,) = plan.blocks
    x = _run(m.blocks.children(), kept, x)
    return m.forward_head(m.norm(x))


def _manual_efficientnet(m, x, plan):
    x = m.bn1(m.conv_stem(x))
    for stage, kept in zip(m.blocks, plan.blocks):
        x = _run(stage.children(), kept, x)
    return m.forward_head(m.bn2(m.conv_head(x)))


def _manual_mobilenetv3(m, x, plan):
    x = m.bn1(m.conv_stem(x))
    for stage, kept in zip(m.blocks, plan.blocks):
        x = _run(stage.children(), kept, x)
    return m.forward_head(x)


# family id -> (timm model name, create kwargs, manual forward, expected stage depths)
FAMILIES = {
    'resnet': ('resnet18', {}, _manual_resnet, (2, 2, 2, 2)),
    'regnet': ('regnetx_002', {}, _manual_regnet, (1, 1, 4, 7)),
    'convnext': ('convnext_atto', {}, _manual_convnext, (2, 2, 6, 2)),
    'vit': ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=4), _manual_vit, (4,)),
    'efficientnet': ('efficientnet_b0', {}, _manual_efficientnet, (1, 2, 2, 3, 3, 4, 1)),
    'mobilenetv3': ('mobilenetv3_small_050', {}, _manual_mobilenetv3, (1, 2, 3, 2, 3, 1)),
}
FAMILY_IDS = list(FAMILIES)


def _randomize(model):
    """Move norm / layer-scale / bias parameters and BN statistics off their init values.

    timm zero-initialises the last norm of residual branches (ResNet) and uses tiny layer scales
    (ConvNeXt), which makes blocks (near) identities at init and would let a wrong block choice
    go unnoticed.
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                if name.endswith('weight') or name.endswith('gamma'):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _make(family, **kwargs):
    name, kw, manual, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **{**kw, **kwargs})
    return _randomize(model), manual


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # tiny models: avoid thread oversubscription on small, shared CPU machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _input(seed=1, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _full_plan(stages):
    return SubnetPlan(tuple(tuple(range(s.depth)) for s in stages))


def _prefix_plan(stages):
    """Shallowest ordered sub-network: drop every droppable tail block of every stage."""
    return SubnetPlan.prefix([s.depth - s.max_tail_drop for s in stages])


def _mask_plan(stages):
    """A non-prefix mask: in each stage, skip every other droppable block (alternating per stage)."""
    blocks = []
    for s, stage in enumerate(stages):
        blocks.append(tuple(i for i in range(stage.depth) if not stage.droppable[i] or (i + s) % 2 == 0))
    return SubnetPlan(tuple(blocks))


def _plans(stages):
    full = _full_plan(stages)
    plans = {'prefix': _prefix_plan(stages), 'mask': _mask_plan(stages)}
    for name, plan in plans.items():
        assert plan != full, f'{name} plan should skip some blocks'
    return plans


def _snapshot(stages):
    return [(st.container._modules, list(st.container._modules.items())) for st in stages]


def _assert_intact(stages, snapshot):
    for st, (dict_obj, items) in zip(stages, snapshot):
        assert st.container._modules is dict_obj
        now = list(st.container._modules.items())
        assert [k for k, _ in now] == [k for k, _ in items]
        assert all(a is b for (_, a), (_, b) in zip(now, items))


# ---------------------------------------------------------------------------------------------
# Stage discovery
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILY_IDS)
def test_stage_depths_and_containers(family):
    model, _ = _make(family)
    stages = subnet_stages(model)
    assert tuple(s.depth for s in stages) == FAMILIES[family][3]
    assert timm_st.method.adapters.stage_depths(stages) == FAMILIES[family][3]
    # every block of every stage is a submodule of the model, each appears exactly once
    owned = {id(m) for m in model.modules()}
    blocks = [b for s in stages for b in s.container.children()]
    assert all(id(b) in owned for b in blocks)
    assert len({id(b) for b in blocks}) == len(blocks)
    for s in stages:
        assert s.droppable[0] is False


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_full_plan_is_bit_identical(family):
    model, manual = _make(family)
    model.eval()
    x = _input()
    stages = subnet_stages(model)
    full = _full_plan(stages)
    with torch.no_grad():
        ref = model(x)
        with use_subnet(stages, full):
            out = model(x)
        by_hand = manual(model, x, full)
    assert torch.equal(out, ref)
    # the hand-written forward is faithful to the model at full depth (validates it for the
    # reduced-plan tests below)
    assert torch.equal(by_hand, ref)


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_reduced_plan_matches_manual_forward(family):
    model, manual = _make(family)
    model.eval()
    x = _input()
    stages = subnet_stages(model)
    snap = _snapshot(stages)
    with torch.no_grad():
        full_out = model(x)
        for name, plan in _plans(stages).items():
            with use_subnet(stages, plan):
                # containers are narrowed to exactly the kept blocks, in order
                for st, kept in zip(stages, plan.blocks):
                    assert len(st.container._modules) == len(kept)
                out = model(x)
            expected = manual(model, x, plan)
            assert torch.equal(out, expected), name
            assert not torch.equal(out, full_out), f'{name} plan did not change the output'
    _assert_intact(stages, snap)
    with torch.no_grad():
        assert torch.equal(model(x), full_out)


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_model_intact_after_failing_forward(family):
    model, _ = _make(family)
    model.eval()
    x = _input()
    stages = subnet_stages(model)
    plan = _mask_plan(stages)
    snap = _snapshot(stages)
    tree = list(model.named_modules())
    with torch.no_grad():
        ref = model(x)
        with pytest.raises(RuntimeError):
            with use_subnet(stages, plan):
                assert any(len(st.container._modules) < st.depth for st in stages)
                model(torch.randn(2, 5, 32, 32))  # wrong channel count: the stem raises
        _assert_intact(stages, snap)
        after = list(model.named_modules())
        assert [n for n, _ in after] == [n for n, _ in tree] and all(a is b for (_, a), (_, b) in zip(after, tree))
        assert torch.equal(model(x), ref)
        # and the context is reusable afterwards
        with use_subnet(stages, plan):
            again = model(x)
        assert not torch.equal(again, ref)
    _assert_intact(stages, snap)


def test_invalid_plan_leaves_model_untouched():
    model, _ = _make('resnet')
    stages = subnet_stages(model)
    snap = _snapshot(stages)
    with pytest.raises(ValueError, match='stages'):
        with use_subnet(stages, SubnetPlan(((0,), (0,)))):
            pass
    with pytest.raises(ValueError, match='keeps block 2'):
        with use_subnet(stages, SubnetPlan(((0, 1), (0, 2), (0,), (0,)))):
            pass
    _assert_intact(stages, snap)


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_channels_last(family):
    model, manual = _make(family)
    model.eval()
    model = model.to(memory_format=torch.channels_last)
    x = _input(channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    stages = subnet_stages(model)
    plan = _mask_plan(stages)
    with torch.no_grad():
        with use_subnet(stages, plan):
            out = model(x)
        expected = manual(model, x, plan)
        assert torch.equal(out, expected)
        # same sub-network as with the default memory format, up to kernel rounding
        ref_model, _ = _make(family)
        ref_model.eval()
        ref_stages = subnet_stages(ref_model)
        with use_subnet(ref_stages, plan):
            ref = ref_model(_input())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_grad_checkpointing_same_grads(family, monkeypatch):
    base, _ = _make(family)
    base.train()
    x = _input()
    plan = _mask_plan(subnet_stages(base))

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting_checkpoint)

    grads = {}
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(ckpt)
        stages = subnet_stages(model)
        snap = _snapshot(stages)
        n_before = len(calls)
        with use_subnet(stages, plan):
            out = model(x)
            out.square().sum().backward()
        assert (len(calls) > n_before) == ckpt, 'checkpointing was / was not used as configured'
        _assert_intact(stages, snap)
        grads[ckpt] = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
        # skipped blocks take no part: no gradient; kept blocks do get one
        for st, kept in zip(stages, plan.blocks):
            for i, blk in enumerate(st.container.children()):
                has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
                if next(blk.parameters(), None) is not None:
                    assert has_grad == (i in kept), (i, kept)

    assert grads[False].keys() == grads[True].keys()
    for n in grads[False]:
        a, b = grads[False][n], grads[True][n]
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize('family', FAMILY_IDS)
def test_drop_path_train_mode_matches_manual(family):
    model, manual = _make(family, drop_path_rate=0.3)
    model.train()
    x = _input()
    stages = subnet_stages(model)
    for name, plan in _plans(stages).items():
        outs = []
        for seed in (11, 12, 13):
            torch.manual_seed(seed)
            with use_subnet(stages, plan):
                out = model(x)
            torch.manual_seed(seed)
            expected = manual(model, x, plan)
            assert torch.equal(out, expected)
            outs.append(out.detach())
        if name == 'mask':
            # drop path is really active on the kept residual blocks: seeds give different outputs
            assert not all(torch.equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------------------------------------
# Droppable flags
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', FAMILY_IDS)
def test_first_block_never_droppable_and_skip_rule(family):
    model, _ = _make(family)
    stages = subnet_stages(model)
    for st in stages:
        blocks = list(st.container.children())
        assert st.droppable[0] is False
        for i, blk in enumerate(blocks[1:], 1):
            if family in ('efficientnet', 'mobilenetv3'):
                assert st.droppable[i] == bool(blk.has_skip)
            elif family == 'resnet':
                assert st.droppable[i] == (blk.downsample is None)
            else:
                assert st.droppable[i] is True
    if family == 'resnet':
        # layer1[0] of resnet18 has an identity skip but is the stage's first block
        assert model.layer1[0].downsample is None
        assert stages[0].droppable[0] is False


def test_stage_forces_first_block_not_droppable():
    st = Stage(nn.Sequential(nn.Identity(), nn.Identity()), (True, True))
    assert st.droppable == (False, True)
    assert st.max_tail_drop == 1
    with pytest.raises(ValueError):
        Stage(nn.Sequential(nn.Identity(), nn.Identity()), (False,))


def test_max_tail_drop_stops_at_non_droppable():
    st = Stage(nn.Sequential(*[nn.Identity() for _ in range(5)]), (False, True, False, True, True))
    assert st.max_tail_drop == 2


def _noskip_arch():
    # stage 1: three blocks without skip connection; stage 2: a normal residual pair
    return decode_arch_def([['ds_r1_k3_s1_c16'], ['ir_r3_k3_s2_e2_c24_noskip'], ['ir_r2_k3_s2_e2_c32']])


@pytest.mark.parametrize('cls', [EfficientNet, MobileNetV3])
def test_blocks_without_skip_not_droppable(cls):
    torch.manual_seed(0)
    model = cls(block_args=_noskip_arch(), num_classes=10).eval()
    stages = subnet_stages(model)
    assert [s.depth for s in stages] == [1, 3, 2]
    skips = [[bool(b.has_skip) for b in s] for s in model.blocks]
    # (MobileNetV3's 16-channel stem gives the first stage's only block an identity skip;
    # it must stay non-droppable anyway as a first block)
    assert skips[1:] == [[False, False, False], [False, True]]
    assert [s.droppable for s in stages] == [(False,), (False, False, False), (False, True)]
    assert [s.max_tail_drop for s in stages] == [0, 0, 1]

    snap = _snapshot(stages)
    for bad in [((0,), (0, 1), (0, 1)), ((0,), (0, 2), (0,)), ((0,), (0,), (0, 1))]:
        with pytest.raises(ValueError, match='skip'):
            with use_subnet(stages, SubnetPlan(bad)):
                pytest.fail('entered use_subnet with a plan that skips a block without skip connection')
    _assert_intact(stages, snap)
    # skipping the one droppable block works and matches the hand-written forward
    plan = SubnetPlan(((0,), (0, 1, 2), (0,)))
    x = _input()
    manual = _manual_efficientnet if cls is EfficientNet else _manual_mobilenetv3
    with torch.no_grad():
        with use_subnet(stages, plan):
            out = model(x)
        assert torch.equal(out, manual(model, x, plan))
        assert not torch.equal(out, model(x))


def test_plan_cannot_skip_first_block():
    with pytest.raises(ValueError):
        SubnetPlan(((1,), (0,)))


# ---------------------------------------------------------------------------------------------
# Unsupported models and user adapters
# ---------------------------------------------------------------------------------------------

def test_no_adapter_plain_sequential():
    with pytest.raises(ValueError) as info:
        subnet_stages(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    msg = str(info.value)
    assert 'Sequential' in msg and 'register_subnet_adapter' in msg


def test_no_adapter_timm_mixer():
    model = timm.create_model('mixer_s16_224', pretrained=False, img_size=32, num_classes=10)
    with pytest.raises(ValueError) as info:
        subnet_stages(model)
    msg = str(info.value)
    assert 'MlpMixer' in msg and 'register_subnet_adapter' in msg


class _Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + torch.tanh(self.conv(x))


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stages = nn.ModuleList([
            nn.Sequential(*[_Res(4) for _ in range(3)]),
            nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), _Res(6), _Res(6)),
        ])
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        for st in self.stages:
            x = st(x)
        return self.head(x.mean((2, 3)))


class _TinyNetChild(_TinyNet):
    pass


@pytest.fixture
def tiny_adapter():
    def fn(model):
        return [Stage(s, (False,) + (True,) * (len(s) - 1)) for s in model.stages]
    register_subnet_adapter(_TinyNet, fn)
    try:
        yield fn
    finally:
        timm_st.method.adapters._ADAPTERS.pop(_TinyNet, None)


def test_custom_adapter_registration(tiny_adapter):
    torch.manual_seed(0)
    model = _TinyNet().eval()
    stages = subnet_stages(model)
    assert [s.depth for s in stages] == [3, 3]
    assert stages[0].container is model.stages[0]
    x = _input()
    plan = SubnetPlan(((0, 2), (0, 1)))
    with torch.no_grad():
        with use_subnet(stages, plan):
            out = model(x)
        h = model.stem(x)
        h = model.stages[0][2](model.stages[0][0](h))
        h = model.stages[1][1](model.stages[1][0](h))
        expected = model.head(h.mean((2, 3)))
        assert torch.equal(out, expected)
        assert not torch.equal(out, model(x))
    # subclasses use the parent's adapter (MRO lookup)
    assert [s.depth for s in subnet_stages(_TinyNetChild())] == [3, 3]


def test_custom_adapter_decorator_and_cleanup():
    assert _TinyNet not in timm_st.method.adapters._ADAPTERS
    try:
        @register_subnet_adapter(_TinyNet)
        def fn(model):
            return [Stage(model.stages[0], (False, True, True))]
        assert [s.depth for s in subnet_stages(_TinyNet())] == [3]
    finally:
        timm_st.method.adapters._ADAPTERS.pop(_TinyNet, None)
    with pytest.raises(ValueError, match='_TinyNet'):
        subnet_stages(_TinyNet())


def test_adapter_returning_no_stages_raises():
    try:
        register_subnet_adapter(_TinyNet, lambda model: [])
        with pytest.raises(ValueError, match='no stages'):
            subnet_stages(_TinyNet())
    finally:
        timm_st.method.adapters._ADAPTERS.pop(_TinyNet, None)


def test_wrapped_model_is_looked_through():
    model, _ = _make('resnet')

    class Wrapper(nn.Module):  # DDP-like: timm's unwrap_model follows `.module`
        def __init__(self, m):
            super().__init__()
            self.module = m

    stages = subnet_stages(Wrapper(model))
    assert stages[0].container is model.layer1


def test_nested_use_subnet_is_refused():
    model = timm.create_model('resnet18', num_classes=3)
    stages = timm_st.subnet_stages(model)
    with timm_st.use_subnet(stages, timm_st.SubnetPlan.prefix((1, 2, 2, 2))):
        with pytest.raises(RuntimeError, match='nested'):
            with timm_st.use_subnet(stages, timm_st.SubnetPlan.prefix((2, 1, 2, 2))):
                pass
    assert len(model.layer1) == 2
