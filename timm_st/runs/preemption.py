"""Preemption: SIGTERM (what SLURM and cloud preemption send) and SIGUSR1 stop a run at the next step boundary
with a recovery checkpoint, from which `--resume auto` continues exactly, and exit code 128 + the signal's number
(143, 138), as a process ended by that signal reports, so that wrappers requeue it as preempted.

The handler only records the signal (no I/O, no device work); the training loop reads the record at each
optimizer-update boundary. Distributed ranks stop at the same step: they agree by one all-reduce every
`log_interval` updates (a signal to any rank stops all of them) and at the end of each epoch.
"""
import signal
import threading
from typing import Dict

import torch

from .errors import TrainingStopped
from .folder import resume_command
from .resumption import gather_rows, save_position

__all__ = ['StopSignals', 'SIGNALS', 'stop_for_signal']

SIGNALS = (signal.SIGTERM, signal.SIGUSR1) if hasattr(signal, 'SIGUSR1') else (signal.SIGTERM,)


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGUSR1 are recorded in `received` instead of ending the
    process; the previous handlers come back on exit."""

    def __init__(self):
        self.received = 0
        self._previous: Dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, distributed: bool, device: torch.device) -> int:
        """The signal every rank stops for (0: none): the largest any rank received (an all-reduce when distributed,
        so every rank must call it at the same step)."""
        if not distributed:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def at_update(self, update_idx: int, interval: int, distributed: bool, device: torch.device) -> int:
        """The signal to stop for after update `update_idx` of the epoch (0: go on): every update in one process;
        distributed, every `interval` updates."""
        if distributed and update_idx % interval:
            return 0
        return self.agreed(distributed, device)


def stop_for_signal(runner, signum: int, epoch: int, step: int, sums=None, save: bool = True) -> TrainingStopped:
    """Save a recovery checkpoint continuing at (epoch, step) with every rank's partial sums `sums` (every rank
    calls this at the same step; `save=False`: last.pth.tar is that position already) and return the stop."""
    folder = runner.state.folder
    if save:
        save_position(runner, epoch, step, None if sums is None else gather_rows(sums.state(), runner.args.distributed))
    saved = folder / (f'recovery-{epoch}-{step}.pth.tar' if save else 'last.pth.tar')
    return TrainingStopped(f'{signal.Signals(signum).name} received: training stopped at epoch {epoch}, step {step}, '
                           f'saved in {saved}. Continue with: {resume_command(folder, runner.argv)}',
                           exit_code=128 + signum)
