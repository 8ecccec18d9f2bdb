"""Lesion study (`timm_st.analysis.lesions`): every figure against a hand-written forward of the CIFAR ResNet that
runs the blocks of each stage in a given order (removed blocks left out, swapped blocks exchanged)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_st.analysis.lesions import lesion_study

from test_analysis_tree import _failing_after, assert_unchanged, cifar_resnet, loaders, snapshot

DEPTHS = (3, 3, 2)
DROPPABLE = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]  # CifarResNet depths (3, 3, 2): first blocks are never droppable


@torch.no_grad()
def _top1_by_hand(model, loader, orders):
    """Top-1 (percent) of the eval-mode model running, in stage `s`, the blocks `orders[s]` in that order."""
    correct = total = 0
    for x, y in loader:
        x = model.stem(x)
        for blocks, order in zip(model.stages, orders):
            for i in order:
                x = blocks[i](x)
        correct += model.forward_head(x).argmax(-1).eq(y).sum().item()
        total += len(y)
    return 100 * correct / total


def _labelled_by_model(model, size):
    """48 images labelled with the full network's predictions: the full network scores 100% and each lesion
    shows as a loss of accuracy (random labels would leave every figure near chance)."""
    loader, _ = loaders(size, n=48)
    x = torch.cat([images for images, _ in loader])
    with torch.no_grad():
        y = model(x).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _top1_without(model, loader, removed):
    return _top1_by_hand(model, loader, [[b for b in range(d) if (s, b) not in removed] for s, d in enumerate(DEPTHS)])


def _top1_swapped(model, loader, stage, block):
    """Blocks `block` and `block + 1` of `stage` swapped."""
    orders = [list(range(d)) for d in DEPTHS]
    orders[stage][block], orders[stage][block + 1] = orders[stage][block + 1], orders[stage][block]
    return _top1_by_hand(model, loader, orders)


@pytest.mark.parametrize('method', ['tree', 'each'])
def test_lesion_study_matches_reference(method):
    model, size = cifar_resnet()
    loader = _labelled_by_model(model, size)
    snap = snapshot(model)
    info = {}
    result = lesion_study(model, loader, 'cpu', max_removed=3, draws=4, seed=3, method=method, info=info)
    assert info['method'] == method
    assert_unchanged(model, snap)

    assert result['full'] == _top1_without(model, loader, set()) == 100
    figures = [e['top1'] for e in result['single'] + result['swap']]
    assert len(set(figures)) >= 3 and min(figures) < 50, f'lesions barely change the accuracy: {figures}'
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
