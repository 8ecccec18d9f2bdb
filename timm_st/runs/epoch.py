"""One training epoch of the runner: timm's step (task forward, loss scaling, gradient accumulation, clipping,
EMA, per-update scheduling, recovery checkpoints), without host-device syncs.

The host reads a tensor value only on log steps (every `log_interval` steps and the epoch's last; under DDP the
non-finite guard's all-reduce runs there too), on recovery steps and once at the end of the epoch; a progress bar
on a terminal advances every step but updates its text only on log steps.

The non-finite guard: `max_nonfinite_steps` consecutive steps whose full-network or sub-network loss
(`task.subnet_loss`, set during the backward) is NaN/inf stop training; under float16 AMP a non-finite
sub-network loss makes the scaler skip the step, which the main loss alone would not show.
`train_subnet_loss` is the mean sub-network loss over the samples of the steps where it was finite.
"""
import logging
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Dict, Optional

import torch
from tqdm import tqdm

from timm import utils

from .errors import TrainingStopped
from .folder import checkpoint_text
from .preemption import stop_for_signal
from .resumption import gather_rows, save_position

__all__ = ['train_one_epoch', 'EpochSums']

_logger = logging.getLogger(__name__)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """A tqdm bar on a terminal (primary rank), timm-style log lines otherwise; text only on log steps."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.desc, self.total = enabled, desc, total
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False) if enabled and _on_terminal() else None

    def advance(self, index: int, text: Optional[str]) -> None:
        if self.bar is not None:
            if text is not None:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and text is not None:
            _logger.info(f'{self.desc} [{index + 1:>4d}/{self.total}]  {text}')

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochSums:
    """The sums of one training epoch and the non-finite guard, kept on the device."""

    def __init__(self, device: torch.device, limit: int):
        zero = dict(dtype=torch.float64, device=device)
        self.loss, self.subnet_loss, self.subnet_samples = (torch.zeros((), **zero) for _ in range(3))
        self.samples = 0
        self.limit = limit
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.stop_step = torch.full((), -1, dtype=torch.int64, device=device)  # first step at the limit, -1: none

    def add(self, step: int, loss: torch.Tensor, batch_size: int, subnet_loss: Optional[torch.Tensor]) -> None:
        """Add one step (no host read): the unscaled loss, and the sub-network loss when the step had one."""
        self.loss += loss.double() * batch_size
        self.samples += batch_size
        finite = torch.isfinite(loss)
        if subnet_loss is not None:
            subnet_finite = torch.isfinite(subnet_loss)
            self.subnet_loss += torch.where(subnet_finite, subnet_loss.double(), 0.0) * batch_size
            self.subnet_samples += subnet_finite.double() * batch_size
            finite = finite & subnet_finite
        if self.limit:
            self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
            hit = (self.stop_step < 0) & (self.streak >= self.limit)
            self.stop_step = torch.where(hit, torch.full_like(self.stop_step, step), self.stop_step)

    def state(self) -> torch.Tensor:
        """One float64 row: loss, samples, sub-network loss and samples, streak, stop step (`load` restores it)."""
        return torch.stack([self.loss, torch.full_like(self.loss, self.samples), self.subnet_loss,
                            self.subnet_samples, self.streak.double(), self.stop_step.double()])

    def load(self, row: torch.Tensor) -> None:
        for tensor, value in zip((self.loss, self.subnet_loss, self.subnet_samples, self.streak, self.stop_step),
                                 row[[0, 2, 3, 4, 5]].tolist()):
            tensor.fill_(value)
        self.samples = int(row[1])

    @staticmethod
    def finite(rows: torch.Tensor) -> bool:
        """Whether no rank's `state` row is in a NaN/inf streak or past the limit."""
        return bool(((rows[:, 4] == 0) & (rows[:, 5] < 0)).all())

    def stopped_at(self, distributed: bool) -> int:
        """The step at which the limit was reached (-1: not reached); a host read (every rank stops together)."""
        if not self.limit:
            return -1
        if distributed:
            torch.distributed.all_reduce(self.stop_step, op=torch.distributed.ReduceOp.MAX)
        return int(self.stop_step.item())

    def totals(self, distributed: bool):
        """(loss sum, samples, sub-network loss sum, its samples) over all ranks: the epoch's one host read."""
        totals = self.state()[:4]
        if distributed:
            torch.distributed.all_reduce(totals)
        return totals.tolist()


def _step(runner, batch_idx: int, x: torch.Tensor, y: torch.Tensor, sums: EpochSums, num_batches: int) -> bool:
    """One training step (a micro-batch); whether it ended with an optimizer update."""
    args, task, optimizer, scaler = runner.args, runner.task, runner.optimizer, runner.loss_scaler
    accum = args.grad_accum_steps
    need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
    steps_in_group = num_batches % accum if batch_idx >= num_batches - num_batches % accum else accum
    if not args.prefetcher:
        x, y = x.to(runner.device), y.to(runner.device)
        if runner.mixup_fn is not None:
            x, y = runner.mixup_fn(x, y)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    with nullcontext() if need_update or not args.distributed else task.no_sync():
        with runner.amp_autocast():
            loss = task(x, y)['loss']
        if steps_in_group > 1:
            loss /= steps_in_group
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip_parameters,
                   need_update=need_update)
        else:
            loss.backward()
            if need_update:
                if args.clip_grad is not None:
                    utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
                optimizer.step()
    sums.add(batch_idx, loss.detach() * steps_in_group, x.shape[0], getattr(task, 'subnet_loss', None))
    return need_update


def _after_update(runner, batch_idx: int, sums: EpochSums) -> None:
    """Zero the gradients, update the EMA and the per-update schedule, write a recovery checkpoint when due."""
    args, st = runner.args, runner.state
    st.num_updates += 1
    runner.optimizer.zero_grad()
    runner.task.update_ema(step=st.num_updates)
    if runner.lr_scheduler is not None:
        runner.lr_scheduler.step_update(num_updates=st.num_updates)
    update_idx = batch_idx // args.grad_accum_steps
    if args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
        # every rank's sums go into it (a gather: a recovery step is a sync point); never after a NaN/inf loss
        rows = gather_rows(sums.state(), args.distributed)
        if not sums.limit or EpochSums.finite(rows):
            save_position(runner, st.epoch, batch_idx + 1, rows)
    signum = runner.signals.at_update(update_idx, args.log_interval, args.distributed, runner.device)
    if signum:  # SIGTERM/SIGUSR1: stop here, at an update boundary, with a recovery checkpoint
        raise stop_for_signal(runner, signum, st.epoch, batch_idx + 1, sums)


def train_one_epoch(runner) -> Dict[str, float]:
    """Train `runner.state.epoch`: train_* metrics (loss, subnet_loss when the task has one, epoch time, images/s)."""
    args, st, loader = runner.args, runner.state, runner.loader_train
    if args.mixup_off_epoch and st.epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif runner.mixup_fn is not None:
            runner.mixup_fn.mixup_enabled = False
    runner.task.get_trainable_module().train()
    num_batches = len(loader)
    sums = EpochSums(runner.device, args.max_nonfinite_steps)
    if st.step and 'sums' in (runner.resume_entry or {}):  # continued mid-epoch: this rank's sums so far
        sums.load(runner.resume_entry['sums'][args.rank])
    progress = _Progress(num_batches, f'Train {st.epoch}/{st.num_epochs}', runner.primary)
    start = time.time()
    runner.optimizer.zero_grad()
    try:
        for batch_idx, (x, y) in enumerate(loader, start=st.step):
            updated = _step(runner, batch_idx, x, y, sums, num_batches)
            st.step = batch_idx + 1
            if updated:
                _after_update(runner, batch_idx, sums)
            text = None
            if batch_idx % args.log_interval == 0 or batch_idx == num_batches - 1:  # a log step: host reads
                stop = sums.stopped_at(args.distributed)
                if stop >= 0:
                    raise _nonfinite_stop(runner, stop)
                lr = runner.optimizer.param_groups[0]['lr']
                text = f'loss {sums.loss.item() / max(sums.samples, 1):.4f}  lr {lr:.3e}'
            progress.advance(batch_idx, text)
    finally:
        progress.close()
    elapsed = time.time() - start
    loss, samples, subnet_loss, subnet_samples = sums.totals(args.distributed)
    metrics = OrderedDict(loss=loss / max(samples, 1))
    if hasattr(runner.task, 'subnet_loss'):
        metrics['subnet_loss'] = subnet_loss / subnet_samples if subnet_samples > 0 else float('nan')
    metrics['epoch_time'] = elapsed
    metrics['img_per_sec'] = samples / max(elapsed, 1e-9)
    return metrics


def _nonfinite_stop(runner, step: int) -> TrainingStopped:
    st, limit = runner.state, runner.args.max_nonfinite_steps
    return TrainingStopped(
        f'the training loss (of the full network or the sub-networks) was NaN or inf for {limit} consecutive steps '
        f'(epoch {st.epoch}, step {step}); training stopped and nothing after the last checkpoint was saved '
        f'({checkpoint_text(st.folder, st.saved_epoch)}). Lower the learning rate (or check the data, amp, clip_grad) '
        f'and resume from that checkpoint with --resume')
