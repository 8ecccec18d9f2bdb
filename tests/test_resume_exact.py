"""Stop anywhere, lose nothing: a run killed with SIGKILL at any point and continued with `--resume auto` ends
exactly as the run that was never stopped: last.pth.tar's weights and EMA weights bit for bit, summary.csv's
rows (losses, accuracies, learning rates; not the times) and results.json, on the CPU with one thread, with
persistent loader workers, prefetcher mixup and random erasing, dropout, stochastic depth, EMA and ST++
sub-networks at random sizes. Every kill leaves a folder that `--resume auto` can continue: a loadable
last.pth.tar and a row for every epoch before it.

Runs are subprocesses of tests/runs_driver.py, which kills the process at a named point (monkeypatched there,
nothing in the package): a training step, the rename of last.pth.tar, the links of checkpoint-N/model_best, a
half-written checkpoint, validation, between an epoch's row and its checkpoint, the end-of-run evaluation.
"""
import signal

import pytest
import torch
from timm.data import FastCollateMixup, create_dataset, create_loader

from runs_driver import assert_same_outcome, outcome, summary, train
from timm_st.runs.checkpoints import load_weights
from timm_st.runs.resumption import RESUME_KEY, checkpoint_position, newest_checkpoint
from timm_st.runs.seeding import seeded_loader, set_loader_epoch

COMMON = ['--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8', '--warmup-epochs',
          '0', '--lr', '0.05', '--device', 'cpu', '--log-interval', '100', '--drop', '0.2', '--drop-path', '0.1',
          '--model-ema', '--model-ema-decay', '0.9', '--mixup', '0.5', '--cutmix', '0.5', '--reprob', '0.5']
# 24 training images in batches of 8: 3 steps an epoch
WORKERS = ['--epochs', '3', '--workers', '2', '--mixup-off-epoch', '2', '--eval-subnets', '2']  # prefetcher
# timm's Mixup in the main process, random erasing in the worker; a recovery checkpoint every update
NO_PREFETCHER = ['--epochs', '2', '--workers', '1', '--no-prefetcher', '--eval-subnets', '0', '--grad-accum-steps', '2',
                 '--recovery-interval', '1']


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp('recipe') / 'stpp.yaml'
    path.write_text('stimulative:\n  num_subnets: 2\n  input_scale: [0.5, 1.0]\n')
    return path


def argv(recipe, image_folder, *extra):
    return ['-c', recipe, '--data-dir', image_folder, *COMMON, *extra]


def assert_continuable(folder):
    """What a kill may leave: last.pth.tar loadable (finite weights) and a row for every epoch before the position
    `--resume auto` continues from (rows after it are redone)."""
    load_weights(folder / 'last.pth.tar')
    epoch, _ = checkpoint_position(newest_checkpoint(folder))
    assert [int(row['epoch']) for row in summary(folder)][:epoch] == list(range(epoch))


def test_sigkill_at_every_point_then_resume_auto_equals_the_uninterrupted_run(tmp_path, recipe, image_folder):
    args = argv(recipe, image_folder, *WORKERS)
    reference = tmp_path / 'reference'
    assert train(reference, args).returncode == 0
    run = tmp_path / 'run'
    kills = [('step', 5), ('replace', 1), ('link', 1), ('validate', 1), ('summary', 1), ('save', 1), ('finish', 1)]
    for point, n in kills:  # each continues the folder the previous kill left
        proc = train(run, args, at=(point, n, 'kill'))
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        assert (run / 'last.pth.tar').is_file(), f'killed at {point}: no last.pth.tar'
        assert_continuable(run)
    assert not (run / 'results.json').exists()  # killed in the final evaluation
    proc = train(run, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outcome(run, reference)


def test_mid_epoch_recovery_point_continues_exactly_and_another_seed_does_not(tmp_path, recipe, image_folder):
    """Killed in epoch 1 after its first update (gradient accumulation 2): `--resume auto` takes the newest
    recovery file, mid-epoch, and ends equal (the epoch's row too); a continuation with another seed is warned
    about and differs, so the equality is not trivial."""
    args = argv(recipe, image_folder, *NO_PREFETCHER)
    reference = tmp_path / 'reference'
    assert train(reference, args).returncode == 0
    run = tmp_path / 'run'
    assert train(run, args, at=('step', 6, 'kill')).returncode == -signal.SIGKILL
    assert checkpoint_position(newest_checkpoint(run)) == (1, 2)
    other = tmp_path / 'other'
    other.mkdir()
    for path in run.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    assert train(run, args).returncode == 0
    assert_same_outcome(run, reference)
    proc = train(other, args + ['--seed', '1'])
    assert proc.returncode == 0 and 'the continuation is not exact' in proc.stderr
    assert not torch.equal(outcome(other)[0]['fc.weight'], outcome(reference)[0]['fc.weight'])


def test_checkpoint_without_resume_state_loads_with_one_warning(tmp_path, recipe, image_folder):
    args = argv(recipe, image_folder, '--epochs', '2', '--workers', '0', '--eval-subnets', '0')
    run = tmp_path / 'run'
    assert train(run, args + ['--stop-epoch', '1']).returncode == 0
    checkpoint = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=False)
    del checkpoint[RESUME_KEY]
    torch.save(checkpoint, run / 'last.pth.tar')  # as an older timm-st or timm's train.py wrote it
    proc = train(run, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count('records no resumption state') == 1
    assert [row['epoch'] for row in summary(run)] == ['0', '1']


def _loader(root, workers):
    dataset = create_dataset('', root=str(root), split='train', is_training=True)
    mixup = FastCollateMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    loader = create_loader(dataset, input_size=(3, 16, 16), batch_size=4, is_training=True, num_workers=workers,
                           device=torch.device('cpu'), persistent_workers=workers > 0, collate_fn=mixup, re_prob=0.5,
                           mean=(0.5,) * 3, std=(0.5,) * 3)
    return seeded_loader(loader, seed=3, rank=0, mixup_off_epoch=2, device=torch.device('cpu'))


def _passes(root, workers, plan, main_seed):
    loader = _loader(root, workers)
    out = []
    for epoch, start in plan:
        torch.manual_seed(main_seed + epoch)  # the main process's state must not matter
        set_loader_epoch(loader, epoch, start)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def _same(a, b):
    return len(a) == len(b) and all(all(map(torch.equal, u, v)) for u, v in zip(a, b))


def test_loader_batches_are_a_function_of_seed_epoch_and_position(image_folder):
    """Transforms, order, prefetcher mixup (in the workers) and random erasing: two persistent workers load what
    the main process loads, whatever the main process's generator state, and a pass started at a position
    loads the tail of the epoch; epochs differ, and mixup is off from mixup_off_epoch on, in the workers too."""
    main = _passes(image_folder, 0, [(0, 0), (1, 0), (2, 0)], main_seed=0)
    workers = _passes(image_folder, 2, [(0, 0), (1, 0), (2, 0)], main_seed=100)
    resumed = _passes(image_folder, 2, [(1, 2), (2, 0)], main_seed=200)
    assert all(_same(a, b) for a, b in zip(main, workers))
    assert _same(resumed[0], main[1][2:]) and _same(resumed[1], main[2]) and len(resumed[0]) == 4
    assert not _same(main[0], main[1])
    assert max(len(torch.unique(y)) for _, y in workers[0]) > 2  # mixed targets in epoch 0
    assert all(len(torch.unique(y)) == 2 for _, y in workers[2])  # mixup off from epoch 2
