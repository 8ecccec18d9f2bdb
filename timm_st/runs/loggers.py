"""Logging: the console of a run, and the one interface every epoch's metrics go through.

`setup_logging` configures the console once per process (timm's format; each warning of a library with
a handler of its own, such as huggingface_hub, printed once); `quiet_checkpoint_saver` turns the kept
checkpoints timm's saver lists after every epoch into one line (the list at debug level). `MetricLoggers`
writes each epoch's row to summary.csv and, when asked, to wandb and TensorBoard (in the run folder).
"""
import logging
import numbers
from pathlib import Path
from typing import Any, Mapping

from .errors import RunError
from .folder import write_summary_row

__all__ = ['setup_logging', 'quiet_checkpoint_saver', 'check_loggers', 'MetricLoggers']

_logger = logging.getLogger(__name__)
_LIBRARIES_WITH_HANDLERS = ('huggingface_hub',)


def setup_logging(level: int = logging.INFO) -> None:
    """timm's console logging (once per process), each library message printed once."""
    from timm.utils import setup_default_logging
    if not any(getattr(h, '_timm_st', False) for h in logging.root.handlers):
        setup_default_logging(level)
        logging.root.handlers[-1]._timm_st = True
    for name in _LIBRARIES_WITH_HANDLERS:
        library = logging.getLogger(name)
        if library.handlers:
            library.propagate = False


class _OneLineCheckpoints(logging.Filter):
    """timm's CheckpointSaver logs 'Current checkpoints:' and up to checkpoint_hist entries after every epoch:
    one line instead (the count and the best), the entries at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith('Current checkpoints'):
            entries = [line.strip() for line in text.splitlines()[1:] if line.strip()]
            _logger.debug('Kept checkpoints: %s', '; '.join(entries))
            best = entries[0] if entries else '-'
            record.msg, record.args = f'Checkpoint saved ({len(entries)} kept; best: {best})', ()
        return True


def quiet_checkpoint_saver() -> None:
    saver_logger = logging.getLogger('timm.utils.checkpoint_saver')
    if not any(isinstance(f, _OneLineCheckpoints) for f in saver_logger.filters):
        saver_logger.addFilter(_OneLineCheckpoints())


def check_loggers(args: Any) -> None:
    """Refuse `log_tensorboard` without the tensorboard package (before any work)."""
    if getattr(args, 'log_tensorboard', False):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise RunError('log_tensorboard needs the tensorboard package: pip install "timm-st[tensorboard]" (or '
                           'pip install tensorboard), or remove --log-tensorboard') from None


class MetricLoggers:
    """Where every epoch's metrics go (primary rank): summary.csv, and wandb / TensorBoard when asked."""

    def __init__(self, folder: Path, args: Any):
        self.folder, self.wandb, self.tensorboard = folder, None, None
        if args.log_wandb:
            try:
                import wandb
            except ImportError:
                _logger.warning('log_wandb is set but wandb is not installed (pip install wandb); not logging to '
                                'wandb.')
            else:
                wandb.init(project=args.wandb_project, name=folder.name, config=vars(args), tags=args.wandb_tags)
                self.wandb = wandb
        if getattr(args, 'log_tensorboard', False):
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=str(folder))

    def log_epoch(self, epoch: int, row: Mapping[str, Any]) -> None:
        write_summary_row(self.folder, epoch, row)
        if self.wandb is not None:
            self.wandb.log({'epoch': epoch, **row})
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, numbers.Number) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, epoch)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
