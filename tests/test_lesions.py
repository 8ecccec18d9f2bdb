"""Lesion study (`timm_st.analysis.lesions`): every figure against a reference computed here with
`use_subnet` + `validate`, or a hand-written forward for swapped blocks."""
import pytest
import torch

from timm_st import SubnetPlan, subnet_stages, use_subnet
from timm_st.analysis.evaluation import validate
from timm_st.analysis.lesions import lesion_study

from test_analysis_tree import _failing_after, assert_unchanged, cifar_resnet, loaders, snapshot

DROPPABLE = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]  # CifarResNet depths (3, 3, 2): first blocks are never droppable


def _top1_without(model, loader, removed):
    masks = [[(s, b) not in removed for b in range(d)] for s, d in enumerate((3, 3, 2))]
    with use_subnet(subnet_stages(model), SubnetPlan.from_masks(masks)):
        return validate(model, loader, 'cpu')['top1']


@torch.no_grad()
def _top1_swapped(model, loader, stage, block):
    """Hand-written forward of the CIFAR ResNet with blocks `block` and `block + 1` of `stage` swapped."""
    correct = total = 0
    for x, y in loader:
        x = model.stem(x)
        for s, blocks in enumerate(model.stages):
            order = list(range(len(blocks)))
            if s == stage:
                order[block], order[block + 1] = order[block + 1], order[block]
            for i in order:
                x = blocks[i](x)
        correct += model.forward_head(x).argmax(-1).eq(y).sum().item()
        total += len(y)
    return 100 * correct / total


@pytest.mark.parametrize('method', ['tree', 'each'])
def test_lesion_study_matches_reference(method):
    model, size = cifar_resnet()
    loader, _ = loaders(size)
    snap = snapshot(model)
    info = {}
    result = lesion_study(model, loader, 'cpu', max_removed=3, draws=4, seed=3, method=method, info=info)
    assert info['method'] == method
    assert_unchanged(model, snap)

    assert result['full'] == validate(model, loader, 'cpu')['top1']
    assert [(e['stage'], e['block']) for e in result['single']] == DROPPABLE
    for e in result['single']:
        assert e['top1'] == _top1_without(model, loader, {(e['stage'], e['block'])})
    assert [e['k'] for e in result['random']] == [1, 2, 3]
    for e in result['random']:
        assert len(e['draws']) == 4
        for d in e['draws']:
            removed = {tuple(sb) for sb in d['removed']}
            assert len(removed) == e['k'] and removed <= set(DROPPABLE)
            assert d['top1'] == _top1_without(model, loader, removed)
        values = torch.tensor([d['top1'] for d in e['draws']], dtype=torch.float64)
        assert e['top1_mean'] == pytest.approx(values.mean().item())
        assert e['top1_std'] == pytest.approx(values.std(unbiased=False).item())
    assert [(e['stage'], e['blocks']) for e in result['swap']] == [(0, [1, 2]), (1, [1, 2])]
    for e in result['swap']:
        assert e['top1'] == _top1_swapped(model, loader, e['stage'], e['blocks'][0])
    assert_unchanged(model, snap)


def test_random_lesions_are_seeded():
    model, size = cifar_resnet()
    loader, _ = loaders(size)

    def removed(seed):
        result = lesion_study(model, loader, 'cpu', max_removed=2, draws=3, seed=seed)
        return [d['removed'] for e in result['random'] for d in e['draws']]

    assert removed(0) == removed(0)
    assert removed(0) != removed(1)
    default = lesion_study(model, loader, 'cpu', draws=1)
    assert [e['k'] for e in default['random']] == list(range(1, len(DROPPABLE) + 1))


def _failing_when_reordered(model):
    """Fails inside the swapped network (method 'each' reorders a stage container while it runs)."""
    stage = model.stages[1]

    def hook(m, args, out):
        names = list(stage._modules)
        if names != sorted(names, key=int):
            raise RuntimeError('injected failure')
    return stage[0].register_forward_hook(hook)


@pytest.mark.parametrize('method, inject', [('each', _failing_when_reordered),
                                            ('tree', lambda m: _failing_after(m.stages[1][1], 2)),
                                            ('tree', lambda m: _failing_after(m.stages[2][1], 12))])
def test_model_bit_identical_after_a_failing_lesion(method, inject):
    model, size = cifar_resnet()
    loader, _ = loaders(size)
    snap = snapshot(model)
    handle = inject(model)
    try:
        with pytest.raises(RuntimeError, match='injected failure'):
            lesion_study(model, loader, 'cpu', draws=2, method=method)
    finally:
        handle.remove()
    assert_unchanged(model, snap)


def test_bad_arguments():
    model, size = cifar_resnet()
    loader, _ = loaders(size)
    with pytest.raises(ValueError, match=r'max_removed must be in 1\.\.5'):
        lesion_study(model, loader, 'cpu', max_removed=6)
    with pytest.raises(ValueError, match='draws must be >= 1'):
        lesion_study(model, loader, 'cpu', draws=0)
