"""Evaluation and BatchNorm re-estimation without per-item host syncs (issue 16.5): host reads of tensor values
made while the package's code runs do not grow with the number of evaluated or calibration batches (counts stay
on the device, re-estimation sets a host-side momentum); the host-side momentum gives the cumulative average that
`momentum=None` gives; a task step reads nothing back."""
import sys

import pytest
import timm
import torch

from timm_st import StimulativeTask, recalibrate_bn
from timm_st.analysis.evaluation import evaluate_plans, space_plans, validate
from timm_st.analysis.tree import calibration_mode
from timm_st.method.batchnorm import _stat_norms

from conftest import batch

READS = ('item', '__bool__', '__float__', '__int__', 'tolist')


class HostReads:
    """Counts reads of tensor values (`Tensor.item`, `__bool__`, `__float__`, `__int__`, `tolist`) made while the
    package's code is on the stack (by it, or by torch code it calls: BatchNorm's `momentum=None` reads
    `num_batches_tracked` inside torch), and host values sent to the device (`torch.tensor(..., device=...)`, a
    synchronous copy from pageable memory on a GPU), each with where the package's innermost frame was. The samplers
    draw on a CPU generator by design and are left out."""

    def __init__(self, monkeypatch):
        self.reads = []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        tensor = self._counted(torch.tensor, 'torch.tensor(device=...)')
        make = torch.tensor
        monkeypatch.setattr(torch, 'tensor', lambda *a, **kw: (tensor if kw.get('device') is not None else make)(*a, **kw))

    def _counted(self, original, name):
        reads = self.reads

        def read(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                path = frame.f_code.co_filename.replace('\\', '/')
                if '/timm_st/' in path:
                    if not path.endswith('method/sampling.py'):
                        reads.append(f'{path.split("/timm_st/")[1]}:{frame.f_lineno} ({name})')
                    break
                frame = frame.f_back
            return original(*args, **kwargs)
        return read

    def during(self, fn):
        start = len(self.reads)
        fn()
        return self.reads[start:]


@pytest.fixture
def host_reads(monkeypatch):
    return HostReads(monkeypatch)


def cifar_model():
    torch.manual_seed(0)
    return timm.create_model('resnet20_cifar', widths=(8, 8, 16), num_classes=10).eval()


def loader(n_batches, seed=0):
    return [batch(n=4, size=16, classes=10, seed=seed + i) for i in range(n_batches)]


@pytest.mark.parametrize('method', ['tree', 'each'])
@pytest.mark.parametrize('bn', ['running', 'recalibrate'])
def test_evaluation_reads_do_not_grow_with_batches(host_reads, method, bn):
    """Twice the evaluation batches and twice the calibration batches: the same reads (those at the end, per
    sub-network, and the tree's one check of its split), none per sub-network per batch."""
    model = cifar_model()
    plans = space_plans(__import__('timm_st').subnet_stages(model))[:6]

    def run(n):
        return host_reads.during(lambda: evaluate_plans(
            model, plans, loader(n), 'cpu', bn=bn, method=method, calib_loader=loader(n, seed=50),
            calib_images=4 * n))
    few, many = run(2), run(4)
    assert len(many) == len(few), f'reads grow with the batches: {sorted(set(many) - set(few)) or many}'
    assert len(few) <= 3 * len(plans) + 4


def test_validate_reads_do_not_grow_with_batches(host_reads):
    model = cifar_model()
    few = host_reads.during(lambda: validate(model, loader(2), 'cpu'))
    many = host_reads.during(lambda: validate(model, loader(5), 'cpu'))
    assert len(few) == len(many) <= 3


def test_recalibration_reads_do_not_grow_with_batches(host_reads):
    model = cifar_model()
    few = host_reads.during(lambda: recalibrate_bn(model, loader(2), 8))
    many = host_reads.during(lambda: recalibrate_bn(model, loader(6), 24))
    assert len(few) == len(many) == 0, many


def test_the_read_counter_sees_momentum_none(host_reads):
    """Control: `momentum=None` (what re-estimation used) reads `num_batches_tracked` in every norm layer on every
    batch; the counter must see those reads (they are made by torch, under the package's frames)."""
    model = cifar_model()

    def calibrate_with_momentum_none(n):
        with calibration_mode(model) as norms:
            for m in norms:
                m.momentum = None
            for x, _ in loader(n):
                model(x)
    few = host_reads.during(lambda: calibrate_with_momentum_none(2))
    many = host_reads.during(lambda: calibrate_with_momentum_none(4))
    assert len(many) - len(few) == 2 * len(_stat_norms(model))


@pytest.mark.parametrize('models', [1, 2], ids=['model', 'model-and-ema'])
def test_host_momentum_gives_the_cumulative_average(models):
    """recalibrate_bn's running statistics equal those of torch's own cumulative average (`momentum=None`, reset
    statistics, train mode) over the same batches, to 1e-6; the count of batches too."""
    torch.manual_seed(0)
    live = timm.create_model('resnet20_cifar', widths=(8, 8, 16), num_classes=10).train()
    for m in _stat_norms(live):  # running statistics far from the reset values, so a missed reset shows
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    copies = [__import__('copy').deepcopy(live) for _ in range(models)]
    reference = __import__('copy').deepcopy(live)
    batches = loader(5, seed=3)
    assert recalibrate_bn(copies if models > 1 else copies[0], batches, 20) == 20
    for m in _stat_norms(reference):
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for x, _ in batches:
            reference(x)
    for model in copies:
        for got, ref in zip(_stat_norms(model), _stat_norms(reference)):
            torch.testing.assert_close(got.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
            assert int(got.num_batches_tracked) == int(ref.num_batches_tracked) == 5
            assert got.momentum == 0.1  # restored
        assert model.training


def test_task_step_reads_nothing(host_reads):
    """Forward, backward (with the sub-network passes) and the optimizer step of ST++: no read."""
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', widths=(8, 8, 16), num_classes=10).train()
    task = StimulativeTask(model, {'num_subnets': 3, 'input_scale': [0.5, 1.0], 'loss': 'kl_direction'},
                           verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(seed):
        optimizer.zero_grad(set_to_none=True)
        task(*batch(n=4, size=16, classes=10, seed=seed))['loss'].backward()
        optimizer.step()
    for seed in range(3):
        assert host_reads.during(lambda: step(seed)) == []
    assert torch.is_tensor(task.subnet_loss) and task.subnet_loss.ndim == 0
