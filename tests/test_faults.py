"""`timm-st train` faults and run-folder safety: existing runs refused or resumed in place, explicit overwrite,
`--resume auto`, `--stop-epoch`, `--save-epochs`, stop on a non-finite loss, Ctrl-C (CPU, tiny runs)."""
import csv
import shlex

import pytest
import torch

import timm_st.runs.runner as runner_module
from timm_st.commands.train import main

BASE = [
    '--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8',
    '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--device', 'cpu', '--hflip', '0',
    '--color-jitter', '0', '--no-prefetcher', '--eval-subnets', '0', '--log-interval', '100',
]  # the image folder has 24 training images: 3 steps per epoch


def argv(image_folder, tmp_path, experiment='run', *extra):
    return BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment', experiment] + [
        str(a) for a in extra]


def summary_lines(folder):
    return (folder / 'summary.csv').read_text().splitlines()


def summary_epochs(folder):
    lines = summary_lines(folder)
    assert sum(line.startswith('epoch') for line in lines) == 1, 'exactly one header'
    return [int(r['epoch']) for r in csv.DictReader(lines)]


def checkpoint_epoch(path):
    return torch.load(path, map_location='cpu', weights_only=False)['epoch']


def last_line(capsys):
    """The final stderr line (timm's log lines come before it); no traceback of ours (in-process reruns of
    setup_default_logging can leave handlers on closed test streams, whose 'Logging error' reports are not ours)."""
    err = capsys.readouterr().err
    assert err.count('Traceback') == err.count('--- Logging error ---')
    return err.strip().splitlines()[-1]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a training epoch starts."""
    def refuse(*a, **k):
        raise AssertionError('a training step ran')
    monkeypatch.setattr(runner_module, 'train_one_epoch', refuse)


class _CountingLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy that does `action(call_index)` at each call (returns NaN or raises from some call on)."""

    def __init__(self, action):
        super().__init__()
        self.calls = 0
        self.action = action

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        self.calls += 1
        return self.action(self.calls - 1, loss)


def patch_loss(monkeypatch, action):
    monkeypatch.setattr(runner_module, 'train_criterion', lambda args: _CountingLoss(action))


# ---------------------------------------------------------------------------------------------
# a run folder is never overwritten by accident

def test_existing_run_refused_byte_identical(tmp_path, image_folder, capsys, monkeypatch):
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 1)) == 0
    folder = tmp_path / 'run'
    before = snapshot(folder)
    assert 'results.json' in before and 'last.pth.tar' in before
    capsys.readouterr()

    def refuse(*a, **k):
        raise AssertionError('a training step ran')
    monkeypatch.setattr(runner_module, 'train_one_epoch', refuse)
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # refused before any logging
    assert f"run folder '{folder}' already holds a run" in err and '--overwrite' in err and '--resume' in err
    assert snapshot(folder) == before
    # resuming a checkpoint that lies outside the folder does not make the folder free either
    elsewhere = tmp_path / 'elsewhere.pth.tar'
    elsewhere.write_bytes(before['last.pth.tar'])
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 2, '--resume', elsewhere)) == 2
    assert 'already holds a run' in capsys.readouterr().err
    assert snapshot(folder) == before


def test_resume_from_elsewhere_into_existing_run_refused(tmp_path, image_folder, capsys, no_training):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'args.yaml').write_text('model: resnet20_cifar\n')
    (tmp_path / 'run' / 'summary.csv').write_text('epoch,train_loss\n0,1.0\n')
    before = snapshot(tmp_path / 'run')
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 1)) == 2
    assert 'already holds a run' in capsys.readouterr().err
    assert snapshot(tmp_path / 'run') == before


def test_overwrite_replaces_the_run_and_its_stale_checkpoints(tmp_path, image_folder):
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 2)) == 0
    assert (folder / 'checkpoint-1.pth.tar').is_file()
    (folder / 'notes.txt').write_text('mine')
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 1, '--overwrite')) == 0
    assert not (folder / 'checkpoint-1.pth.tar').exists()  # stale checkpoint of the earlier run gone
    assert summary_epochs(folder) == [0]
    assert checkpoint_epoch(folder / 'last.pth.tar') == 0 and checkpoint_epoch(folder / 'model_best.pth.tar') == 0
    assert (folder / 'notes.txt').read_text() == 'mine'  # not a run file: kept


def test_overwrite_of_the_checkpoint_being_resumed_refused(tmp_path, image_folder, capsys):
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 1)) == 0
    before = snapshot(folder)
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 2, '--overwrite', '--resume',
                     folder / 'last.pth.tar')) == 2
    assert '--overwrite would delete' in capsys.readouterr().err
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# resume in place, --resume auto, --stop-epoch, --save-epochs

def test_resume_in_place_replaces_later_rows(tmp_path, image_folder):
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3)) == 0
    old_last = (folder / 'last.pth.tar').read_bytes()
    # continue from the end of epoch 0: epochs 1 and 2 are trained again and their rows replaced
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3, '--resume', folder / 'checkpoint-0.pth.tar')) == 0
    assert summary_epochs(folder) == [0, 1, 2]
    assert checkpoint_epoch(folder / 'last.pth.tar') == 2 and (folder / 'last.pth.tar').read_bytes() != old_last
    assert (folder / 'results.json').is_file()


def test_resume_auto_stop_epoch_and_noop(tmp_path, image_folder, capsys):
    folder = tmp_path / 'auto'
    common = argv(image_folder, tmp_path, 'auto', '--epochs', 3, '--resume', 'auto', '--checkpoint-hist', 2)
    # nothing to resume yet: a fresh run, stopped after 1 of 3 epochs; not finished, so no results.json
    assert main(common + ['--stop-epoch', '1']) == 0
    assert summary_epochs(folder) == [0] and checkpoint_epoch(folder / 'last.pth.tar') == 0
    assert not (folder / 'results.json').exists()
    assert '--resume auto' in capsys.readouterr().out
    # the same command without the stop continues in place
    assert main(common) == 0
    assert summary_epochs(folder) == [0, 1, 2] and checkpoint_epoch(folder / 'last.pth.tar') == 2
    assert len(list(folder.glob('checkpoint-*.pth.tar'))) == 2  # checkpoint_hist holds across the resume
    import yaml
    assert yaml.safe_load((folder / 'args.yaml').read_text())['resume'] == 'auto'
    # complete: a further auto resume changes nothing
    before = snapshot(folder)
    assert main(common) == 0
    assert 'Nothing to do' in capsys.readouterr().out
    assert snapshot(folder) == before


def test_resume_auto_needs_an_experiment(tmp_path, image_folder, capsys, no_training):
    args = BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path), '--resume', 'auto', '--epochs', '1']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert '--resume auto continues OUTPUT/EXPERIMENT in place' in err and '--experiment NAME' in err
    assert list(tmp_path.iterdir()) == []


def test_milestone_after_the_schedule_refused(tmp_path, image_folder, capsys, no_training):
    assert main(argv(image_folder, tmp_path, 'x', '--epochs', 2, '--save-epochs', 1, 3)) == 2
    assert 'save_epochs [3]: milestones are completed-epoch counts within 1..epochs (2)' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


@pytest.mark.skipif(not hasattr(__import__('timm').utils.CheckpointSaver, 'save_milestone'),
                    reason='milestone checkpoints need timm >= 1.0.31')
def test_save_epochs_milestone_forces_an_evaluation(tmp_path, image_folder):
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3, '--val-interval', 2, '--save-epochs', 1)) == 0
    assert checkpoint_epoch(folder / 'milestone-1.pth.tar') == 0
    rows = list(csv.DictReader(summary_lines(folder)))
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert rows[0]['eval_top1'] != '' and rows[1]['eval_top1'] != '' and rows[2]['eval_top1'] != ''


# ---------------------------------------------------------------------------------------------
# non-finite loss and Ctrl-C

def test_nonfinite_loss_stops_without_claiming_a_result(tmp_path, image_folder, capsys, monkeypatch):
    # finite during epoch 0 (3 steps), NaN from the first step of epoch 1 on
    patch_loss(monkeypatch, lambda i, loss: loss if i < 3 else loss * float('nan'))
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3, '--max-nonfinite-steps', 2)) == 1
    err = last_line(capsys)
    assert err.startswith('timm-st train: error: ')
    assert 'NaN or inf for 2 consecutive steps (epoch 1, step 1)' in err
    assert f'last checkpoint: {folder / "last.pth.tar"} (end of epoch 0)' in err
    assert not (folder / 'results.json').exists()
    assert summary_epochs(folder) == [0]
    assert checkpoint_epoch(folder / 'last.pth.tar') == 0 and checkpoint_epoch(folder / 'model_best.pth.tar') == 0
    weights = torch.load(folder / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# steps below the limit, and consecutive vs total non-finite steps: tests/test_runner_steps.py


def test_ctrl_c_prints_where_to_resume_and_resumes(tmp_path, image_folder, capsys, monkeypatch):
    def interrupt(i, loss):
        if i == 4:  # second step of epoch 1
            raise KeyboardInterrupt
        return loss
    patch_loss(monkeypatch, interrupt)
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 2)) == 130
    err = last_line(capsys)
    assert f'interrupted in epoch 1; last checkpoint: {folder / "last.pth.tar"} (end of epoch 0)' in err
    command = err.split('Continue with: ')[1]
    assert command.startswith('timm-st train ') and command.endswith('--resume auto')
    assert not (folder / 'results.json').exists()
    monkeypatch.setattr(runner_module, 'train_criterion', lambda args: torch.nn.CrossEntropyLoss())
    assert main(shlex.split(command)[2:]) == 0
    assert summary_epochs(folder) == [0, 1] and (folder / 'results.json').is_file()


def test_interrupted_continuation_leaves_a_consistent_folder(tmp_path, image_folder, monkeypatch):
    """Continuing in place from epoch 0 then stopping: nothing of the abandoned epochs 1-2 is left to misread."""
    folder = tmp_path / 'run'
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3)) == 0

    def interrupt(i, loss):
        if i == 1:  # second step of the continued epoch 1
            raise KeyboardInterrupt
        return loss
    patch_loss(monkeypatch, interrupt)
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 3, '--resume', folder / 'checkpoint-0.pth.tar')) == 130
    assert summary_epochs(folder) == [0]
    assert sorted(p.name for p in folder.glob('checkpoint-*')) == ['checkpoint-0.pth.tar']
    assert checkpoint_epoch(folder / 'model_best.pth.tar') == 0
    assert not (folder / 'results.json').exists()


def test_recovery_interval_writes_recovery_checkpoints(tmp_path, image_folder):
    assert main(argv(image_folder, tmp_path, 'run', '--epochs', 1, '--recovery-interval', 1)) == 0
    # timm's saver keeps the two newest recovery points: recovery-EPOCH-STEP continues at batch STEP of EPOCH
    assert sorted(p.name for p in (tmp_path / 'run').glob('recovery-*')) == ['recovery-0-2.pth.tar',
                                                                             'recovery-0-3.pth.tar']
