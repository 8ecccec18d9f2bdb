"""Preemption and elastic restarts: SIGUSR1 and SIGTERM stop a run at the next optimizer-update boundary with a
recovery checkpoint and exit codes 138 / 143 and the resume command; `--resume auto` continues mid-epoch and ends
exactly as the uninterrupted run (no batch seen twice or skipped: the weights; the epoch's partial sums: its
summary row). Under `torchrun --max-restarts 1`, a rank that dies mid-epoch makes every rank restart from the
last checkpoint, and the run ends with the weights of an uninterrupted 2-rank run (gloo, CPU).

Runs are subprocesses of tests/runs_driver.py, which sends the signal (or ends the rank) at a named point.
"""
import socket
import subprocess
import sys

import pytest

from runs_driver import ENV, assert_same_outcome, train
from timm_st.runs.resumption import checkpoint_position, newest_checkpoint

# 24 training images in batches of 8 (of 4 per rank with 2 ranks): 3 steps an epoch
COMMON = ['--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--warmup-epochs', '0', '--lr', '0.05',
          '--epochs', '2', '--device', 'cpu', '--log-interval', '100', '--drop', '0.2', '--drop-path', '0.1',
          '--model-ema', '--model-ema-decay', '0.9', '--reprob', '0.5', '--eval-subnets', '0']


@pytest.fixture
def args(tmp_path, image_folder):
    recipe = tmp_path / 'stpp.yaml'
    recipe.write_text('stimulative:\n  num_subnets: 2\n  input_scale: [0.5, 1.0]\n')
    return ['-c', recipe, '--data-dir', image_folder, *COMMON]


def test_signals_save_at_the_next_update_and_resume_auto_continues_exactly(tmp_path, args):
    args = args + ['--batch-size', '8', '--workers', '2', '--mixup', '0.5', '--grad-accum-steps', '2']
    reference = tmp_path / 'reference'
    assert train(reference, args).returncode == 0
    run = tmp_path / 'run'
    proc = train(run, args, at=('step', 2, 'usr1'))  # during epoch 0's step 1, which ends an update
    assert proc.returncode == 138, proc.stderr[-3000:]
    assert checkpoint_position(newest_checkpoint(run)) == (0, 2)
    assert proc.stderr.strip().splitlines()[-1].endswith('--experiment run --resume auto')
    # continued from (0, 2): its 2nd step is epoch 1's step 0, which accumulates; it stops after step 1
    proc = train(run, args, at=('step', 2, 'term'))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert checkpoint_position(newest_checkpoint(run)) == (1, 2)
    assert train(run, args).returncode == 0
    assert_same_outcome(run, reference)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(folder, args, *driver_options, restarts=0):
    """torchrun with the c10d rendezvous and a TCPStore per attempt: torch's shared store (the default, and the
    static rendezvous) can hand a restarted group the previous attempt's addresses (pytorch#135712)."""
    from runs_driver import __file__ as driver
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--max-restarts', str(restarts),
           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{_free_port()}', '--monitor-interval', '0.2',
           driver, *driver_options, '--train', *map(str, args), '--output', str(folder.parent), '--experiment',
           folder.name, '--resume', 'auto']
    env = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def test_torchrun_restarts_every_rank_after_one_dies_and_ends_equal(tmp_path, args):
    args = args + ['--batch-size', '4', '--workers', '1']
    reference = tmp_path / 'reference'
    proc = _torchrun(reference, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / 'run'
    # rank 1 dies before its step 1 of epoch 1, on the first attempt only
    proc = _torchrun(run, args, '--at', 'step', '5', 'exit', '--rank', '1', '--first-attempt', restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'runs_driver: exit at step call 5' in proc.stderr  # rank 1 died
    assert '(continuing the run in place)' in proc.stderr  # the group restarted from the run folder
    assert_same_outcome(run, reference)
