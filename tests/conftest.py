import copy
from contextlib import contextmanager

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from timm_st import SubnetPlan


class FixedSampler:
    """Returns the given plans in order, cycling; records what it returned."""

    def __init__(self, plans):
        self.plans = list(plans)
        self.calls = 0

    def sample(self):
        plan = self.plans[self.calls % len(self.plans)]
        self.calls += 1
        return plan


IMAGE_SIZE = 64  # resnet18's layer4 runs on 2x2 maps here (1x1 at 32 px: gradients mostly zero)


@pytest.fixture
def resnet():
    """A small BatchNorm ResNet (resnet18: stage depths 2, 2, 2, 2) in train mode, every residual branch active.

    timm zero-inits the last BatchNorm scale of each block (`zero_init_last`), which silences every
    residual branch of a fresh model: sub-networks would equal the full network and most gradients
    would be exactly zero. `zero_init_last=False` gives every block signal.
    """
    torch.manual_seed(0)
    return timm.create_model('resnet18', num_classes=7, zero_init_last=False).train()


def batch(n=4, size=IMAGE_SIZE, classes=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def clone(model):
    return copy.deepcopy(model)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def randomize_bn_affine(model):
    """BatchNorm scales in [0.5, 1.5] and shifts in [-0.2, 0.2] (seeded by the caller): no block starts silent."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def half_batch_reference(task, data, steps, device='cpu'):
    """What each of two DDP ranks must hold after step s of `steps`: the mean of the single-process gradients of
    the two halves of `data(s)`, the second half drawing the plans the first drew (as every rank does)."""
    references = []
    for step in range(steps):
        x, y = data(step)
        halves, state = [], task.sampler.state_dict()
        for r in range(2):
            if r == 1:
                task.sampler.load_state_dict(state)
            task(x.chunk(2)[r].to(device), y.chunk(2)[r].to(device))['loss'].backward()
            halves.append({n: g.cpu() for n, g in grads(task.model).items()})
            task.model.zero_grad(set_to_none=True)
        references.append({n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]})
    return references


def assert_grads_close(got, ref, rel=1e-6):
    assert got.keys() == ref.keys()
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err <= rel, f'{name}: relative error {err:.3e} > {rel:g}'


PLANS = [SubnetPlan.prefix((1, 2, 1, 1), input_size=48), SubnetPlan.prefix((2, 1, 2, 1)),
         SubnetPlan.from_masks([[1, 1], [1, 0], [1, 1], [1, 0]], input_size=40)]


def assert_nontrivial_grads(grads, min_nonzero=0.95):
    """At least `min_nonzero` of all compared gradient elements (a `{name: tensor}` dict, as `grads()`
    returns) are non-zero, and no parameter's gradient is all zeros: a comparison of such gradients
    can see an error in any block."""
    assert grads, 'no gradients to compare'
    total = sum(g.numel() for g in grads.values())
    nonzero = sum(int(torch.count_nonzero(g)) for g in grads.values())
    silent = sorted(n for n, g in grads.items() if not torch.count_nonzero(g))
    assert nonzero >= min_nonzero * total, (
        f'only {nonzero / total:.1%} of {total} compared gradient elements are non-zero (< {min_nonzero:.0%})')
    assert not silent, f'all-zero gradients (the comparison cannot see these): {silent}'


def stem_stages_head(model):
    """A residual model's parts, found by hand (not through the package's adapters): `(stem, stages, head)`,
    where `stem` and `head` are callables and `stages` is a list of lists of blocks, run in order.
    timm's `ResNet` and this package's `CifarResNet`; the head is the model's own (`forward_head`)."""
    from timm.models.resnet import ResNet
    from timm_st.models.cifar_resnet import CifarResNet
    if isinstance(model, ResNet):
        def stem(x):
            return model.maxpool(model.act1(model.bn1(model.conv1(x))))
        stages = [list(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]
    elif isinstance(model, CifarResNet):
        stem = model.stem
        stages = [list(stage) for stage in model.stages]
    else:
        raise TypeError(f'stem_stages_head: no hand-written split for {type(model).__name__}')
    return stem, stages, model.forward_head


def subnet_forward(model, plan, x):
    """The sub-network `plan` built by hand: the batch resized (bilinear, antialiased) to `plan.input_size`,
    the stem, the kept blocks of each stage (`plan.blocks`), the head. BatchNorm as the model's mode says."""
    if plan.input_size is not None and x.shape[-1] != plan.input_size:
        x = F.interpolate(x, size=(plan.input_size,) * 2, mode='bilinear', align_corners=False, antialias=True)
    stem, stages, head = stem_stages_head(model)
    x = stem(x)
    for blocks, kept in zip(stages, plan.blocks):
        for i in kept:
            x = blocks[i](x)
    return head(x)


@contextmanager
def restored_buffers(model):
    """Whatever runs inside leaves every buffer (BatchNorm running statistics and counts) as it was: the modules
    get copies of their buffers for the block, and their own tensors back afterwards (never written in place,
    so a graph that saved the copies can still run backward)."""
    saved = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    for m, name, b in saved:
        m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, name, b in saved:
            m._buffers[name] = b


def assert_subnets_differ(model, plans, x, min_rel=0.05):
    """Each plan's sub-network logits (built by hand, batch statistics, buffers left alone) differ from the
    full network's by at least `min_rel` relative norm: a test comparing sub-network passes can tell a
    sub-network from the full network. Returns the relative differences."""
    with torch.no_grad(), restored_buffers(model):
        full = model(x)
        rels = [float((subnet_forward(model, p, x) - full).norm() / full.norm()) for p in plans]
    assert all(r >= min_rel for r in rels), f'sub-network logits too close to the full network: {rels}'
    return rels


def write_image_folder(root):
    """A tiny 3-class image folder (train: 8, validation: 4 images per class, 16x16)."""
    rng = np.random.RandomState(0)
    for split, count in (('train', 8), ('validation', 4)):
        for label in range(3):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 60, (16, 16, 3)).astype(np.uint8) + np.uint8(80 * label)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('images'))
