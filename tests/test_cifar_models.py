"""CIFAR ResNets (`timm_st.models.cifar_resnet`): timm registration, architecture, timm model API, ST adapter."""
import copy

import pytest
import torch

import timm
from timm.models import group_parameters

import timm_st
import timm_st.models  # registers the *_cifar models and their sub-network adapter
from timm_st import SubnetPlan, subnet_stages, use_subnet
from timm_st.models import CifarBasicBlock, CifarResNet

BLOCKS_PER_STAGE = {
    'resnet20_cifar': 3, 'resnet32_cifar': 5, 'resnet44_cifar': 7, 'resnet56_cifar': 9, 'resnet110_cifar': 18,
}
# He et al. 2016, Table 6 (10 classes)
PAPER_PARAMS = {
    'resnet20_cifar': 0.27e6, 'resnet32_cifar': 0.46e6, 'resnet44_cifar': 0.66e6, 'resnet56_cifar': 0.85e6,
    'resnet110_cifar': 1.7e6,
}


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _expected_params(n, num_classes):
    """Closed-form count: stem, 3 stages of n basic blocks (16/32/64), two 1x1+BN projections, fc."""
    bn = lambda c: 2 * c  # noqa: E731
    total = 3 * 16 * 9 + bn(16)
    c_in = 16
    for c in (16, 32, 64):
        for i in range(n):
            total += c_in * c * 9 + bn(c) + c * c * 9 + bn(c)
            if c_in != c:
                total += c_in * c + bn(c)  # option-B projection shortcut
            c_in = c
    return total + 64 * num_classes + num_classes


def _x(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(name='resnet20_cifar', seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


@pytest.mark.parametrize('name', list(BLOCKS_PER_STAGE))
def test_create_model_and_param_count(name):
    assert name in timm.list_models('*_cifar')
    model = _model(name, num_classes=10)
    assert isinstance(model, CifarResNet)
    n = BLOCKS_PER_STAGE[name]
    count = _num_params(model)
    assert count == _expected_params(n, 10)
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, count
    assert 6 * n + 2 == int(name[len('resnet'):-len('_cifar')])
    assert [len(s) for s in model.stages] == [n, n, n]


def test_pretrained_cfg_and_defaults():
    model = timm.create_model('resnet56_cifar')
    cfg = model.pretrained_cfg
    assert model.num_classes == 100 and model.fc.out_features == 100
    assert cfg['input_size'] == (3, 32, 32)
    assert tuple(cfg['mean']) == (0.5071, 0.4865, 0.4409)
    assert tuple(cfg['std']) == (0.2673, 0.2564, 0.2762)
    assert cfg['num_classes'] == 100 and cfg['crop_pct'] == 1.0
    assert cfg['classifier'] == 'fc' and model.get_classifier(name_only=True) == 'fc'
    assert isinstance(model.get_submodule(cfg['first_conv']), torch.nn.Conv2d)
    assert not cfg.get('url') and not cfg.get('hf_hub_id')
    assert timm.create_model('resnet56_cifar', num_classes=10).fc.out_features == 10
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg['input_size'] == (3, 32, 32) and data_cfg['crop_pct'] == 1.0


def test_pretrained_true_fails_clearly():
    with pytest.raises(RuntimeError, match='No pretrained weights exist for resnet56_cifar'):
        timm.create_model('resnet56_cifar', pretrained=True)


def test_architecture():
    model = _model('resnet20_cifar')
    assert model.stem.conv.kernel_size == (3, 3) and model.stem.conv.stride == (1, 1)
    assert model.stem.conv.out_channels == 16
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    for s, (stage, width, stride) in enumerate(zip(model.stages, (16, 32, 64), (1, 2, 2))):
        for i, block in enumerate(stage):
            assert isinstance(block, CifarBasicBlock)
            assert block.conv1.out_channels == block.conv2.out_channels == width
            assert block.conv1.stride == ((stride, stride) if i == 0 else (1, 1))
            projects = s > 0 and i == 0
            assert (block.downsample is not None) == projects
            assert block.has_identity == (not projects)
            if projects:
                assert block.downsample.conv.kernel_size == (1, 1)
                assert block.downsample.conv.stride == (2, 2)


@pytest.mark.parametrize('size', [32, 16])
def test_output_and_feature_shapes(size):
    model = _model('resnet32_cifar', num_classes=10).eval()
    x = _x(size=size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, size // 4, size // 4)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        assert model(x).shape == (2, 10)
        torch.testing.assert_close(model(x), model.forward_head(feats))


def test_feature_info():
    model = _model('resnet20_cifar')
    assert model.num_features == 64
    info = model.feature_info
    assert [f['num_chs'] for f in info] == [16, 16, 32, 64]
    assert [f['reduction'] for f in info] == [1, 1, 2, 4]
    assert [f['module'] for f in info][1:] == ['stages.0', 'stages.1', 'stages.2']
    for f in info:
        model.get_submodule(f['module'])
    fmodel = timm.create_model('resnet20_cifar', features_only=True, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        outs = fmodel(_x())
    assert [tuple(o.shape) for o in outs] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]


def test_reset_classifier():
    model = _model('resnet20_cifar').eval()
    x = _x()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(3, global_pool='max')
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(model.forward_features(x).amax((2, 3))))
    assert not model.fc.training


def test_group_matcher():
    model = _model('resnet20_cifar')
    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(groups) == 1 + 9 + 1  # stem, 9 blocks, head
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + 3 + 1


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_same_gradients():
    model = _model('resnet20_cifar', num_classes=10).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing
    x = _x(n=4)
    out, ref = _loss_and_grads(model, x)
    out_c, got = _loss_and_grads(ckpt, x)
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-9, msg=n)
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.grad_checkpointing


def test_drop_path():
    model = _model('resnet20_cifar', num_classes=10, drop_path_rate=0.2)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for stage in model.stages for b in stage]
    assert rates[0] == 0. and rates[-1] == pytest.approx(0.2)
    assert rates == pytest.approx([0.2 * i / 8 for i in range(9)])
    assert all(isinstance(b.drop_path, timm.layers.DropPath) for s in model.stages for b in s if b is not model.stages[0][0])
    x = _x(n=4)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        plain = _model('resnet20_cifar', num_classes=10).eval()
        plain.load_state_dict(model.state_dict())  # drop-path has no state
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # drop-path is off in eval


def test_dropout_in_head():
    model = _model('resnet20_cifar', num_classes=10, drop_rate=0.5)
    x = _x()
    model.train()
    with torch.no_grad():
        f = model.forward_features(x)
        torch.manual_seed(0)
        a = model.forward_head(f)
        torch.manual_seed(1)
        b = model.forward_head(f)
    assert not torch.allclose(a, b)


def test_channels_last():
    model = _model('resnet20_cifar', num_classes=10).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        feats = model.forward_features(x.to(memory_format=torch.channels_last))
        out = model.forward_head(feats)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['resnet20_cifar', 'resnet56_cifar'])
def test_subnet_stages(name):
    n = BLOCKS_PER_STAGE[name]
    model = _model(name)
    stages = subnet_stages(model)
    assert timm_st.method.adapters.stage_depths(stages) == (n, n, n)
    for stage, container in zip(stages, model.stages):
        assert stage.container is container
        assert stage.droppable == (False,) + (True,) * (n - 1)
        assert stage.max_tail_drop == n - 1


def _manual_forward(model, x, plan):
    x = model.stem(x)
    for stage, kept in zip(model.stages, plan.blocks):
        blocks = list(stage.children())
        for i in kept:
            x = blocks[i](x)
    return model.forward_head(x)


@pytest.mark.parametrize('plan', [
    SubnetPlan.prefix((1, 2, 3)),
    SubnetPlan.from_masks([[1, 0, 1], [1, 1, 0], [1, 0, 0]]),
])
@pytest.mark.parametrize('checkpointing', [False, True])
def test_use_subnet_matches_kept_blocks(plan, checkpointing):
    model = _model('resnet20_cifar', num_classes=10).eval()
    model.set_grad_checkpointing(checkpointing)
    stages = subnet_stages(model)
    x = _x()
    ref = _manual_forward(model, x, plan)
    full = model(x)
    with use_subnet(stages, plan):
        assert [len(s) for s in model.stages] == list(plan.depths)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, full)
    assert [len(s) for s in model.stages] == [3, 3, 3]
    torch.testing.assert_close(model(x), full, rtol=0, atol=0)


def test_use_subnet_gradients_only_reach_kept_blocks():
    model = _model('resnet20_cifar', num_classes=10).train()
    model.set_grad_checkpointing(True)
    plan = SubnetPlan.prefix((1, 2, 3))
    with use_subnet(subnet_stages(model), plan):
        model(_x()).sum().backward()
    for s, (stage, kept) in enumerate(zip(model.stages, plan.blocks)):
        for i, block in enumerate(stage):
            has_grad = block.conv1.weight.grad is not None
            assert has_grad == (i in kept), (s, i)
