"""Resumption: what a checkpoint records beyond timm's entries so that a run continues exactly, how it is written
so that no kill can lose it, and which checkpoint `--resume auto` continues from.

`RunSaver` (timm's CheckpointSaver) adds one entry, RESUME_KEY, to the weights, optimizer, loss scaler, EMA and
task state timm writes:

  epoch, step      the position: the next batch to train (step 0: an epoch boundary)
  num_updates      optimizer updates so far (the per-update schedule and the EMA warmup continue from it)
  seed, world_size what the keyed random draws depend on (`seeding`: no generator state is saved)
  eval_metrics     the last validation's metrics (results.json of a run killed in its final evaluation)
  sums             mid-epoch only: every rank's partial sums of the epoch (`epoch.EpochSums`), so that the
                   epoch's summary row equals the uninterrupted run's

timm replaces last.pth.tar and duplicates checkpoint-N/model_best by unlinking the target first (a kill in between
leaves none); `RunSaver` does each in one atomic rename. Mid-epoch checkpoints are timm's recovery files
(recovery-EPOCH-STEP.pth.tar); `newest_checkpoint` picks the one furthest into training.
"""
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from timm.utils import CheckpointSaver

from .checkpoints import read_checkpoint

__all__ = ['RESUME_KEY', 'RunSaver', 'link_replace', 'resume_entry', 'save_position', 'checkpoint_position',
           'newest_checkpoint', 'read_resume', 'gather_rows']

_logger = logging.getLogger(__name__)

RESUME_KEY = 'resume'


def link_replace(src, dst) -> None:
    """Make `dst` a hard link to (where links fail, a copy of) `src` in one atomic rename: a kill at any moment
    leaves either the old `dst` or the new one, never none or a partial one."""
    tmp = f'{dst}.tmp'
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class _TaskWithEntry:
    """The task as the saver sees it: the task's checkpoint entries plus the saver's resume entry."""

    def __init__(self, task, saver: 'RunSaver'):
        self.task, self.saver = task, saver

    def get_checkpoint_state(self, ema: bool = False, **kwargs) -> Dict[str, Any]:
        state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        if not ema:
            state[RESUME_KEY] = dict(self.saver.entry)
        return state


class RunSaver(CheckpointSaver):
    """timm's CheckpointSaver writing `entry` (set before each save) under RESUME_KEY, with atomic replacements."""

    def __init__(self, *args, task, **kwargs):
        super().__init__(*args, task=_TaskWithEntry(task, self), **kwargs)
        self.entry: Dict[str, Any] = {}

    def _replace(self, src, dst):
        os.replace(src, dst)  # atomic; timm unlinks dst first

    def _duplicate(self, src, dst):
        link_replace(src, dst)


def resume_entry(runner, epoch: int, step: int, sums: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The RESUME_KEY entry of a checkpoint continuing `runner`'s run at (epoch, step); `sums`: every rank's
    partial sums of that epoch (`gather_rows`), mid-epoch."""
    args, st = runner.args, runner.state
    return dict(epoch=epoch, step=step, num_updates=st.num_updates, seed=args.seed, world_size=args.world_size,
                eval_metrics=st.eval_metrics, **({} if sums is None else {'sums': sums}))


def save_position(runner, epoch: int, step: int, sums: Optional[torch.Tensor] = None) -> None:
    """A recovery checkpoint (timm's recovery-EPOCH-STEP.pth.tar) continuing at (epoch, step); primary rank only
    writes, the others return."""
    if runner.saver is not None:
        runner.saver.entry = resume_entry(runner, epoch, step, sums)
        runner.saver.save_recovery(epoch, batch_idx=step)


def checkpoint_position(path) -> Optional[Tuple[int, int]]:
    """(epoch, step) at which a checkpoint continues training; without a recorded position the epoch after its own
    for last.pth.tar (timm's rule), None for other files."""
    checkpoint = read_checkpoint(path)
    entry = checkpoint.get(RESUME_KEY)
    if isinstance(entry, dict):
        return int(entry['epoch']), int(entry['step'])
    if Path(path).name == 'last.pth.tar' and 'epoch' in checkpoint:
        return int(checkpoint['epoch']) + 1, 0
    return None


def newest_checkpoint(folder: Path) -> str:
    """The checkpoint `--resume auto` continues from: of last.pth.tar and the recovery checkpoints recording a
    position, the one furthest into training (last.pth.tar on ties); '' when the folder holds none."""
    newest, furthest = '', None
    for path in [folder / 'last.pth.tar', *sorted(folder.glob('recovery-*.pth.tar'))]:
        if path.is_file():
            at = checkpoint_position(path)
            if at is not None and (furthest is None or at > furthest):
                newest, furthest = str(path), at
    return newest


def read_resume(path: str, seed: int, world_size: int, verbose: bool = True) -> Optional[Dict[str, Any]]:
    """The resume entry of the checkpoint a run continues from; None (with one warning) when it has none. Another
    seed or world size is warned about as not exact (and another world size drops the mid-epoch sums)."""
    entry = read_checkpoint(path).get(RESUME_KEY)
    if not isinstance(entry, dict):
        if verbose:
            _logger.warning(f'{path} records no resumption state (written by an older timm-st or by timm\'s train.py): '
                            f'training continues from the epoch after its own, but not exactly as the uninterrupted '
                            f'run would have (data order, augmentations and other random draws differ)')
        return None
    changed = [f'{name} {entry[name]} -> {now}' for name, now in (('seed', seed), ('world_size', world_size))
               if entry.get(name) != now]
    if changed and verbose:
        _logger.warning(f'{path} was written with another {", ".join(changed)}: the continuation is not exact')
    if entry.get('world_size') != world_size:
        entry.pop('sums', None)
    return entry


def gather_rows(row: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Every rank's `row` stacked in rank order (a collective: every rank calls it), on the CPU."""
    if not distributed:
        return row[None].cpu()
    rows = [torch.empty_like(row) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, row)
    return torch.stack(rows).cpu()
