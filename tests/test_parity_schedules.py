"""The cheaper sub-network schedules train identically on both runners: timm's train.py with the hook and
`timm-st train` (a real train.py checkout in TIMM_TRAIN_PY; skipped without it).

`subnet_interval`, `subnet_batch_fraction`, `start_epoch`, `coef` and `bn: update` on the tiny recipes of
test_parity.py (resnet20_cifar, 3 steps of 8 images per epoch): the steps that run sub-networks, the images
and coefficient they see, the sampled plans, every step's main loss, every sub-network loss and the validation
must be identical, and the steps and images must be the ones the keys define (so two runners that both dropped
a key would fail too).

Run, e.g.: TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py pytest tests/test_parity_schedules.py
"""
import sys

import pytest

from test_hook import RECORDER, TRAIN_PY, TrainPyRun, losses, needs_train_py, plans, recipe, workdir  # noqa: F401
from test_parity import eval_row, run_timm_st_train
from timm_st.method.task import _SubnetStep

pytestmark = needs_train_py

SCHEDULE_RECORDER = 'timm_st_test_schedule_recorder'
# a device module recording every step that ran sub-networks: its index, images, coefficient and mean loss
SCHEDULE_RECORDER_SRC = '''
import json
import os

from timm_st.method.task import _SubnetStep

_run = _SubnetStep.run


def _recording_run(self, grad):
    _run(self, grad)
    with open(os.environ['ST_RECORD'], 'a') as f:
        f.write(json.dumps({'subnet_step': self.task.train_steps - 1, 'images': self.x.shape[0],
                            'coef': self.coef, 'subnet_loss': self.task.subnet_loss.item()}) + '\\n')


_SubnetStep.run = _recording_run
'''

# name -> (stimulative section, recipe keys, steps with sub-networks, images they see)
CASES = {
    # 3 steps: sub-networks on steps 0 and 2, on ceil(0.3 * 8) = 3 images
    'interval_fraction': ({'num_subnets': 2, 'subnet_interval': 2, 'subnet_batch_fraction': 0.3}, {}, [0, 2], 3),
    # 2 epochs of 3 steps, sub-networks from epoch 1 (steps 3-5) on even steps only: step 4; steps count from 0
    # in epoch 0 too
    'interval_from_epoch': ({'num_subnets': 1, 'subnet_interval': 2, 'start_epoch': 1, 'coef': 2.0, 'bn': 'update'},
                            {'epochs': 2}, [4], 8),
}


def subnet_steps(records):
    return [r for r in records if 'subnet_step' in r]


@pytest.mark.parametrize('name', list(CASES))
def test_schedules_identical_on_both_runners(workdir, monkeypatch, name):
    section, keys, steps, images = CASES[name]
    (workdir / 'plugins' / f'{SCHEDULE_RECORDER}.py').write_text(SCHEDULE_RECORDER_SRC)
    path = recipe(workdir / f'schedule_{name}.yaml', section,
                  device_modules=('timm_st.commands.hook', RECORDER, SCHEDULE_RECORDER), **keys)
    run = TrainPyRun(TRAIN_PY, workdir, path, f'py_{name}').finish()
    assert run.rc == 0, run.output[-3000:]
    monkeypatch.setattr(_SubnetStep, 'run', _SubnetStep.run)  # restored after the test (the recorder patches it)
    try:
        ours = run_timm_st_train(workdir, monkeypatch, path, name)
    finally:
        sys.modules.pop(SCHEDULE_RECORDER, None)
    theirs = run.records
    epochs = keys.get('epochs', 1)
    assert len(losses(theirs)) == 3 * epochs
    assert [r['subnet_step'] for r in subnet_steps(theirs)] == steps
    assert {r['images'] for r in subnet_steps(theirs)} == {images}
    assert {r['coef'] for r in subnet_steps(theirs)} == {section.get('coef', 1.0)}
    assert len(plans(theirs)) == len(steps) * section['num_subnets']
    assert subnet_steps(ours) == subnet_steps(theirs)
    assert plans(ours) == plans(theirs)
    assert losses(ours) == losses(theirs)
    mine, timms = eval_row(workdir / 'out' / f'cli_{name}'), eval_row(workdir / 'out' / f'py_{name}')
    assert mine == pytest.approx(timms, rel=1e-6, abs=1e-6)
