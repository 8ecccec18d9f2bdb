"""Errors of a run: one base class that carries the exit code of the command that meets it.

Every refusal of input (a recipe, a command line, a run folder, a checkpoint, a source to analyse or
publish) is a `RunError` with exit code 2 and a one-line message that names the problem and the fix;
commands print `timm-st CMD: error: <message>` and return the code. `TrainingStopped` is the one
subclass a caller must tell apart: training that stopped before its end (1 for a non-finite loss,
130 for Ctrl-C, 128 + the signal for SIGTERM/SIGUSR1: `preemption`), whose message says where to resume from.
"""
from typing import Optional

__all__ = ['RunError', 'TrainingStopped', 'BAD_INPUT', 'STOPPED', 'INTERRUPTED']

BAD_INPUT, STOPPED, INTERRUPTED = 2, 1, 130


class RunError(Exception):
    """Input that cannot run; the one-line message says what and how to fix it. Exit code 2."""

    exit_code = BAD_INPUT

    def __init__(self, message: str, exit_code: Optional[int] = None):
        super().__init__(' '.join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingStopped(RunError):
    """Training stopped before its end: a non-finite loss (exit code 1) or Ctrl-C (130)."""

    exit_code = STOPPED
