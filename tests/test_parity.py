"""Parity of the two runners against a real timm train.py checkout (TIMM_TRAIN_PY; skipped without it).

The same tiny recipes (resnet20_cifar on a generated 3-class image folder, CPU, fp32, no augmentation,
3 steps) train through timm's train.py with the hook and through `timm-st train`; the sampled
sub-networks (blocks and input size), the targets and every step's loss must be identical, and so
must the epoch's validation. The ST++ recipe exercises `train_img_sizes`, `input_scale`, six
sub-networks and KL-; a train.py without `train_img_sizes` (v1.0.27) must refuse that key before
training, and train the rest identically. Bad input is refused by the real train.py as by the
stand-in of test_validation.py (which is what runs in CI).

Run, e.g.: TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py pytest tests/test_parity.py
(with the Python environment whose timm matches that checkout).
"""
import csv
import math
import os
import sys

import pytest
import torch
import yaml

from test_hook import (RECORDER, TRAIN_PY, TrainPyRun, losses, needs_train_py, plans, read_records, recipe,
                       workdir)  # noqa: F401  (workdir is a fixture)

pytestmark = needs_train_py


def train_py_options():
    """The option names of the checkout's train.py (its global parser), read without running it."""
    import ast
    tree = ast.parse(open(TRAIN_PY).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument':
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith('--'):
                    names.add(arg.value[2:].replace('-', '_'))
    return names


HAS_TRAIN_IMG_SIZES = bool(TRAIN_PY) and os.path.isfile(TRAIN_PY) and 'train_img_sizes' in train_py_options()

# resnet20_cifar: 3 stages of 3 blocks; the recipes' stimulative sections
ST = {'num_subnets': 2, 'input_scale': [0.5, 1.0], 'recalibrate_bn': 16}
STPP = {'num_subnets': 6, 'loss': 'kl_direction', 'norm': 'layernorm', 'amplitude': 1.0, 'temperature': 1.0,
        'sample_space': {'max_drop': [1, 2, 1]}, 'input_scale': [0.43, 1.0]}
CASES = {
    'st': dict(stimulative=ST),
    'stpp': dict(stimulative=STPP, train_img_sizes=[12]),
    'stpp_no_train_sizes': dict(stimulative=STPP),
    'st_bce': dict(stimulative={'num_subnets': 1}, bce_loss=True, smoothing=0.0),  # train.py builds CE here
    'st_bce_smoothing': dict(stimulative={'num_subnets': 1}, bce_loss=True, smoothing=0.1),
    'st_lr_from_base': dict(stimulative={'num_subnets': 1}, lr=None, lr_base=0.4, lr_base_size=64),
}


def write_case(workdir, name):
    keys = dict(CASES[name])
    return recipe(workdir / f'parity_{name}.yaml', keys.pop('stimulative'), **keys)


def run_timm_st_train(workdir, monkeypatch, path, name):
    """`timm-st train` in this process, recording through the same device module as the train.py run."""
    from timm_st.commands.train import main
    from timm_st.method.task import StimulativeTask as Task
    record = workdir / f'cli_{name}.jsonl'
    record.unlink(missing_ok=True)
    monkeypatch.setenv('ST_RECORD', str(record))
    monkeypatch.syspath_prepend(str(workdir / 'plugins'))
    monkeypatch.setattr(Task, '_sample', Task._sample)  # restored after the test (the recorder patches them)
    monkeypatch.setattr(Task, 'forward', Task.forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train.py subprocess (OMP_NUM_THREADS=1)
    try:
        rc = main(['-c', str(path), '--data-dir', str(workdir / 'data'), '--device', 'cpu', '--output',
                   str(workdir / 'out'), '--experiment', f'cli_{name}', '--eval-subnets', '0', '--overwrite'])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(RECORDER, None)
    assert rc == 0
    return read_records(record)


def eval_row(folder):
    with open(folder / 'summary.csv') as f:
        row = list(csv.DictReader(f))[-1]
    return {k: float(row[k]) for k in ('eval_loss', 'eval_top1', 'eval_top5')}


@pytest.mark.parametrize('name', list(CASES))
def test_same_plans_losses_and_validation_as_timm_st_train(workdir, monkeypatch, name):
    path = write_case(workdir, name)
    run = TrainPyRun(TRAIN_PY, workdir, path, f'py_{name}').finish()
    if 'train_img_sizes' in CASES[name] and not HAS_TRAIN_IMG_SIZES:
        assert run.rc == 2 and run.records == [], run.output[-2000:]
        assert "recipe key(s) ['train_img_sizes'] not supported by timm's train.py" in run.output
        assert "upgrade timm's train.py" in run.output and 'Traceback' not in run.output
        assert not (workdir / 'out' / f'py_{name}').exists()
        return
    assert run.rc == 0, run.output[-3000:]
    ours = run_timm_st_train(workdir, monkeypatch, path, name)
    theirs = run.records
    section = CASES[name]['stimulative']
    assert len(losses(theirs)) == 3 and len(plans(theirs)) == 3 * section['num_subnets'] > 0  # never two empty lists
    assert plans(ours) == plans(theirs)
    assert [r['target'] for r in ours if 'loss' in r] == [r['target'] for r in theirs if 'loss' in r]
    assert losses(ours) == losses(theirs)
    if 'train_img_sizes' in CASES[name]:
        assert {p[1] for p in plans(theirs)} <= set(range(int(0.43 * 12), 13))  # sides drawn from the 12 crop
    mine, timms = eval_row(workdir / 'out' / f'cli_{name}'), eval_row(workdir / 'out' / f'py_{name}')
    assert mine == pytest.approx(timms, rel=1e-6, abs=1e-6)


# bad input through the real train.py: (id, recipe keys, extra command line, words of the one-line message)
REFUSALS = [
    ('misspelled_key', {'weight_decy': 0.1}, [], ["'weight_decy'", "did you mean 'weight_decay'"]),
    ('learning_rate', {'learning_rate': 0.1}, [], ["'learning_rate'"]),
    ('lr_nan', {'lr': math.nan}, [], ['lr must be a finite number >= 0']),
    ('epochs_0', {'epochs': 0}, [], ['epochs must be >= 1']),
    ('mean_length', {'mean': [0.5, 0.5]}, [], ['mean', '2 values']),
    ('kl_direction_bce', {'bce_loss': True, 'stimulative': {'loss': 'kl_direction'}}, [], ['kl_direction', 'bce_loss']),
    ('eval_subnets', {'eval_subnets': 5}, [], ['eval_subnets', 'timm-st analyze']),
    ('unknown_sched', {'sched': 'cosin'}, [], ["scheduler 'cosin'"]),
    ('val_split_missing', {'val_split': 'nosuch'}, [], ["validation split 'nosuch' not found"]),
    ('device_cuda', {'device': 'cuda'}, ['--device', 'cuda'], ["device 'cuda'", '--device cpu']),
    ('resume_folder', {}, ['--resume', 'DATA'], ['is a folder']),
    ('existing_run', {}, ['--experiment', 'EXISTING'], ['already holds a run']),
]


@pytest.mark.parametrize('name,keys,extra,words', REFUSALS, ids=[r[0] for r in REFUSALS])
def test_real_train_py_refuses_before_any_work(workdir, name, keys, extra, words):
    if name == 'device_cuda' and torch.cuda.is_available():
        pytest.skip('a CUDA device is available here')
    keys = dict(keys)
    path = recipe(workdir / f'bad_{name}.yaml', keys.pop('stimulative', {'num_subnets': 1}), **keys)
    existing = workdir / 'out' / 'existing'
    existing.mkdir(parents=True, exist_ok=True)
    (existing / 'summary.csv').write_text('epoch,train_loss\n0,1.0\n')
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    extra = [str(workdir / 'data') if a == 'DATA' else 'existing' if a == 'EXISTING' else a for a in extra]
    run = TrainPyRun(TRAIN_PY, workdir, path, f'bad_{name}', *extra).finish()
    assert run.rc == 2 and run.records == [], run.output[-2000:]
    lines = [line for line in run.output.splitlines() if line.startswith('timm_st: error: ')]
    assert len(lines) == 1 and 'Traceback' not in run.output, run.output[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (workdir / 'out' / f'bad_{name}').exists()
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


def test_demo_recipe_runs_on_train_py(workdir, tmp_path):
    """`dataset: digits` works on train.py: the hook writes the image folder and points data_dir at it."""
    from pathlib import Path
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / 'recipes' / 'demo_digits.yaml').read_text())
    demo.update(epochs=1, warmup_epochs=0)
    demo['device_modules'] = demo['device_modules'] + [RECORDER]
    path = tmp_path / 'demo.yaml'
    path.write_text(yaml.safe_dump(demo))
    run = TrainPyRun(TRAIN_PY, workdir, path, 'demo', '--data-dir', str(tmp_path / 'digits')).finish()
    assert run.rc == 0, run.output[-3000:]
    assert (tmp_path / 'digits' / 'validation').is_dir() and len(losses(run.records)) == 1438 // 64
    num_subnets = demo['stimulative']['num_subnets']
    assert len(plans(run.records)) == num_subnets * len(losses(run.records)) > 0
    assert all(math.isfinite(loss) for loss in losses(run.records))
