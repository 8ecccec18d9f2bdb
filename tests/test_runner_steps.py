"""The runner's training step: no host reads of tensor values except on log steps and at the end of the epoch
(issue 16.1), and the non-finite guard that also sees the sub-network losses under float16 loss scaling (16.2)."""
import csv
import math
import sys

import pytest
import torch

import timm_st.runs.epoch as epoch_module
import timm_st.runs.runner as runner_module
from timm_st.commands.train import main
from timm_st.method.task import StimulativeTask

BASE = ['--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--warmup-epochs', '0', '--lr', '0.05',
        '--workers', '0', '--device', 'cpu', '--no-prefetcher', '--eval-subnets', '0', '--hflip', '0',
        '--stimulative', 'num_subnets=1']
READS = ('item', '__bool__', '__float__', '__int__', '__index__', 'tolist', 'cpu', 'numpy')


@pytest.fixture
def host_reads(monkeypatch):
    """Records (step, file:line) of every host read of a tensor value made by timm_st's code during training steps.
    The step is the batch index of the step in progress, 'end' for the epoch's closing sums. The samplers draw on a
    CPU generator by design (never a device tensor) and are left out."""
    reads, where = [], {'step': None}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            path = frame.f_code.co_filename.replace('\\', '/')
            if where['step'] is not None and '/timm_st/' in path and not path.endswith('method/sampling.py'):
                reads.append((where['step'], f'{path.split("/timm_st/")[1]}:{frame.f_lineno}'))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in READS:
        counting(name)
    step, totals, train_one_epoch = epoch_module._step, epoch_module.EpochSums.totals, runner_module.train_one_epoch

    def tagged_step(runner, batch_idx, *args):
        where['step'] = batch_idx
        return step(runner, batch_idx, *args)

    def tagged_totals(self, distributed):
        where['step'] = 'end'
        return totals(self, distributed)

    def tagged_epoch(runner):
        try:
            return train_one_epoch(runner)
        finally:
            where['step'] = None

    monkeypatch.setattr(epoch_module, '_step', tagged_step)
    monkeypatch.setattr(epoch_module.EpochSums, 'totals', tagged_totals)
    monkeypatch.setattr(runner_module, 'train_one_epoch', tagged_epoch)
    return reads


@pytest.mark.parametrize('terminal', [False, True], ids=['log-lines', 'progress-bar'])
@pytest.mark.parametrize('accum', [1, 2])
def test_host_reads_only_on_log_steps(tmp_path, image_folder, host_reads, monkeypatch, terminal, accum):
    monkeypatch.setattr(epoch_module, '_on_terminal', lambda: terminal)
    # 24 images in batches of 2: 12 steps an epoch; log steps 0, 5, 10 and the last (11)
    argv = BASE + ['--batch-size', '2', '--epochs', '2', '--log-interval', '5', '--grad-accum-steps', str(accum),
                   '--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment', 'run']
    assert main(argv) == 0
    steps = [s for s, _ in host_reads if s != 'end']
    assert steps and set(steps) <= {0, 5, 10, 11}, [r for r in host_reads if r[0] not in (0, 5, 10, 11, 'end')]
    per_log_step = len(steps) / (2 * 4)
    assert per_log_step <= 2  # the guard and the loss text
    assert sum(s == 'end' for s, _ in host_reads) == 2  # one read of the epoch's sums per epoch


def test_the_read_counter_sees_reads_on_every_step(tmp_path, image_folder, host_reads):
    """Control: with every step a log step, the counter sees the package's reads on every step."""
    argv = BASE + ['--batch-size', '2', '--epochs', '1', '--log-interval', '1', '--data-dir', str(image_folder),
                   '--output', str(tmp_path), '--experiment', 'run']
    assert main(argv) == 0
    assert {s for s, _ in host_reads if s != 'end'} == set(range(12))


# ---------------------------------------------------------------------------------------------
# non-finite sub-network losses under float16 AMP (timm's NativeScaler skips those steps)

def nan_subnet_losses(monkeypatch, nonfinite):
    """Sub-network loss of the i-th sub-network pass times NaN where `nonfinite(i)`; the full network's stays finite."""
    calls = {'n': 0}
    original = StimulativeTask._subnet_loss

    def loss(self, *args):
        value = original(self, *args)
        calls['n'] += 1
        return value * float('nan') if nonfinite(calls['n'] - 1) else value
    monkeypatch.setattr(StimulativeTask, '_subnet_loss', loss)
    return calls


def fp16_run(tmp_path, image_folder, *extra):
    argv = BASE + ['--amp', '--amp-dtype', 'float16', '--batch-size', '4', '--log-interval', '1', '--data-dir',
                   str(image_folder), '--output', str(tmp_path), '--experiment', 'run', *extra]
    return main(argv)


def summary(tmp_path):
    with open(tmp_path / 'run' / 'summary.csv') as f:
        return list(csv.DictReader(f))


def test_fp16_subnet_nan_stops_the_run(tmp_path, image_folder, monkeypatch, capsys):
    nan_subnet_losses(monkeypatch, lambda i: True)
    assert fp16_run(tmp_path, image_folder, '--epochs', '2', '--max-nonfinite-steps', '3') == 1
    err = capsys.readouterr().err
    assert 'NaN or inf for 3 consecutive steps (epoch 0, step 2)' in err and 'sub-networks' in err
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_fp16_one_skipped_step_keeps_the_subnet_loss_finite(tmp_path, image_folder, monkeypatch):
    """One non-finite sub-network loss: the step is skipped by the scaler, the run goes on, and the epoch's
    train_subnet_loss is the mean over the steps whose sub-network loss was finite."""
    calls = nan_subnet_losses(monkeypatch, lambda i: i == 1)
    assert fp16_run(tmp_path, image_folder, '--epochs', '1', '--max-nonfinite-steps', '2') == 0
    assert calls['n'] == 6
    value = float(summary(tmp_path)[0]['train_subnet_loss'])
    assert math.isfinite(value) and value > 0


@pytest.mark.parametrize('pattern,stops', [
    (lambda i: i % 2 == 0, False),  # NaN, finite, NaN, ...: 3 non-finite steps in total, never 2 in a row
    (lambda i: i in (2, 3), True),  # two in a row
], ids=['alternating', 'consecutive'])
def test_the_limit_counts_consecutive_steps_not_total(tmp_path, image_folder, monkeypatch, capsys, pattern, stops):
    nan_subnet_losses(monkeypatch, pattern)
    code = fp16_run(tmp_path, image_folder, '--epochs', '1', '--max-nonfinite-steps', '2')
    assert code == (1 if stops else 0)
    if stops:
        assert 'NaN or inf for 2 consecutive steps (epoch 0, step 3)' in capsys.readouterr().err
