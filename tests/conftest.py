import copy

import numpy as np
import pytest
import timm
import torch
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


@pytest.fixture
def resnet():
    """A small BatchNorm ResNet (stage depths 2, 2, 2, 2) in train mode."""
    torch.manual_seed(0)
    return timm.create_model('resnet18', num_classes=7).train()


def batch(n=4, size=32, classes=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def clone(model):
    return copy.deepcopy(model)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, ref, rel=1e-6):
    assert got.keys() == ref.keys()
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err <= rel, f'{name}: relative error {err:.3e} > {rel:g}'


PLANS = [SubnetPlan.prefix((1, 2, 1, 1), input_size=24), SubnetPlan.prefix((2, 1, 2, 1)),
         SubnetPlan.from_masks([[1, 1], [1, 0], [1, 1], [1, 0]], input_size=20)]


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
