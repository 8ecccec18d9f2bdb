"""`timm-st train` with a fault injected at a named point, for the resumption tests (test_resume_exact.py,
test_preemption.py), run as a subprocess (also under torchrun):

    python runs_driver.py [--at POINT N ACTION] [--rank R] [--first-attempt] --train TRAIN ARGS...

POINT is where, N its N-th call in this process, ACTION what happens then: `kill` (SIGKILL to this process:
nothing after it runs), `term` / `usr1` (SIGTERM / SIGUSR1 to this process, which goes on), `exit` (the
process dies with exit code 1, as a crashed rank). `--rank R`: only on rank R; `--first-attempt`: only before
torchrun's first restart. Nothing of this is in the package: the points are monkeypatched here.

Also the helpers the tests share: `train` (a run of this driver, continued in place with `--resume auto`),
`outcome` (what an exact continuation must reproduce) and `assert_same_outcome`.
"""
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

TIMES = ('train_epoch_time', 'train_img_per_sec')  # summary.csv columns that are measured times
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def _patch(owner, name, fire, after=False, when=lambda *a, **k: True):
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        hit = when(*args, **kwargs)
        if hit and not after:
            fire()
        out = original(*args, **kwargs)
        if hit and after:
            fire()
        return out
    setattr(owner, name, patched)


def _partial_save(fire, count):
    """torch.save that, on the N-th call, writes half of the file and then fires (a kill during a write)."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if count() != 0:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        with open(f, 'wb') as out:
            out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            out.flush()
        fire()
    torch.save = save


def inject(point: str, n: int, action: str) -> None:
    from timm_st.runs import epoch, loggers, runner
    calls = [0]

    def count():  # calls left before the N-th
        calls[0] += 1
        return n - calls[0]

    def fire():
        print(f'runs_driver: {action} at {point} call {n}', file=sys.stderr, flush=True)
        if action == 'exit':
            os._exit(1)
        os.kill(os.getpid(), {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'usr1': signal.SIGUSR1}[action])

    def nth():
        if count() == 0:
            fire()
    if point == 'save':
        return _partial_save(fire, count)
    points = {
        'step': (epoch, '_step', False, None),  # before a training step
        'replace': (os, 'replace', False, lambda src, dst: str(dst).endswith('last.pth.tar')),  # last's rename
        'link': (os, 'link', False, None),  # checkpoint-N / model_best made from last
        'validate': (runner.Runner, 'evaluate', False, None),
        'summary': (loggers.MetricLoggers, 'log_epoch', True, None),  # after an epoch's row, before its checkpoint
        'finish': (runner.Runner, 'finish', False, None),  # the end-of-run evaluation
    }
    owner, name, after, when = points[point]
    _patch(owner, name, nth, after, when or (lambda *a, **k: True))


def main(argv):
    split = argv.index('--train')  # torchrun's parser would swallow a '--'
    options, train_args = argv[:split], argv[split + 1:]
    rank_only = options[options.index('--rank') + 1] if '--rank' in options else None
    first_only = '--first-attempt' in options
    armed = (rank_only is None or os.environ.get('RANK', '0') == rank_only) and (
        not first_only or os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0')
    if '--at' in options and armed:
        i = options.index('--at')
        inject(options[i + 1], int(options[i + 2]), options[i + 3])
    from timm_st.commands.train import main as train_main
    return train_main(train_args)


# --- shared by the tests -------------------------------------------------------------------------------

def train(folder: Path, argv, at=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    """One `timm-st train ... --resume auto` process on `folder` (OUTPUT/EXPERIMENT), `at` = (POINT, N, ACTION)."""
    cmd = [sys.executable, __file__, *(['--at', *map(str, at)] if at else []), '--train', *map(str, argv),
           '--output', str(folder.parent), '--experiment', folder.name, '--resume', 'auto']
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


def summary(folder: Path):
    with open(folder / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def outcome(folder: Path):
    """What an exact continuation reproduces: last.pth.tar's weights and EMA weights, summary.csv without the times,
    results.json."""
    checkpoint = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)
    rows = [{k: v for k, v in row.items() if k not in TIMES} for row in summary(folder)]
    results = json.loads((folder / 'results.json').read_text()) if (folder / 'results.json').exists() else None
    return checkpoint['state_dict'], checkpoint.get('state_dict_ema'), rows, results


def assert_same_outcome(folder: Path, reference: Path) -> None:
    weights, ema, rows, results = outcome(folder)
    ref_weights, ref_ema, ref_rows, ref_results = outcome(reference)
    assert rows == ref_rows
    assert results == ref_results
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    assert (ema is None) == (ref_ema is None)
    for name in ref_ema or {}:
        assert torch.equal(ema[name], ref_ema[name]), f'EMA {name}'


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
