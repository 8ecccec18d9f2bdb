"""The training runner of `timm-st train`: a class with stages over timm's own components, and its state.

`Runner(args, config, argv).run()` trains any timm `TrainingTask` (the stimulative task of a recipe with a
`stimulative:` section, timm's `ClassificationTask` without) through the callbacks `patches/` defines for timm's
train.py, when the task has them: `task.set_epoch(epoch)` before each epoch and `task.before_validate(loader_train,
amp_autocast=...)` before each validation. Stages: `check()` validates the run exactly as a real run does, building
nothing on a device and writing nothing; `setup()` builds everything, then creates the run folder (the first
write); `train_epoch()` (`epoch.py`), `evaluate()`; `finish()` writes results.json, evaluated with the code and
rules of `timm-st analyze`. Where the run stands lives in `RunState`. What timm provides is called, not rewritten.
"""
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from timm import utils

from ..analysis.evaluation import evaluate_plans, subnet_plans, subnet_statistics, validate
from ..method.adapters import subnet_stages
from ..method.config import StimulativeConfig, describe_method
from .build import (build_model, build_task, default_device, import_device_modules, mixup_active, precision,
                    train_criterion)
from .data import calibration_loader, class_names, create_split, data_config, dataset_location, image_mode
from .epoch import train_one_epoch
from .errors import INTERRUPTED, TrainingStopped
from .folder import (TIMM_ST_TRAIN, auto_resume_path, checkpoint_text, clear_run, folder_mode, restore_saver,
                     resume_command, rewind, run_folder_path, write_args, write_results)
from .loggers import MetricLoggers, check_loggers, quiet_checkpoint_saver
from .options import CALIB_IMAGES, augmentation
from .preemption import StopSignals, stop_for_signal
from .resumption import RunSaver, read_resume, resume_entry
from .seeding import seeded_loader, set_loader_epoch
from ..prefetch import guard_prefetcher
from .validation import check_dataset_classes, check_run

__all__ = ['Runner', 'RunState', 'RunOutcome']

_logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where a run stands: what one stage hands to the next (and what a continuation must restore)."""
    folder: Optional[Path] = None  # OUTPUT/EXPERIMENT
    folder_mode: Optional[str] = None  # 'fresh', 'resume' (continued in place) or 'overwrite'
    resume_path: str = ''
    start_epoch: int = 0
    end_epoch: int = 0  # this invocation stops before it (stop_epoch)
    num_epochs: int = 0  # the schedule's length
    epoch: int = 0  # the epoch being trained
    step: int = 0  # batches done in that epoch: the position within the epoch
    start_step: int = 0  # batches of start_epoch done before this invocation (a run continued mid-epoch)
    num_updates: int = 0  # optimizer updates since the start of training
    saved_epoch: Optional[int] = None  # the last epoch with a checkpoint
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    eval_metrics: Optional[Dict[str, float]] = None


@dataclass
class RunOutcome:
    """What a run produced: results.json's content ({} when it did not finish) and the lines the command reports."""
    results: Dict[str, Any] = field(default_factory=dict)
    message: str = ''


class Runner:
    """One run of `timm-st train`: `args` from `recipe.parse_args`, `config` the validated stimulative config (None
    for common training), `argv` the command line (for the resume command of a stopped run)."""

    def __init__(self, args, config: Optional[StimulativeConfig], argv: Sequence[str] = ()):
        self.args, self.config, self.argv = args, config, list(argv)
        self.state = RunState()
        self.saver = self.loggers = self.resume_entry = None
        self.primary = True
        self.signals = StopSignals()  # installed while the epochs run

    # --- stage 0: check ---------------------------------------------------------------------------
    def check(self) -> 'Runner':
        """Validate the run exactly as a real run does, before any work: nothing is built on a device or written."""
        args, st = self.args, self.state
        import_device_modules(args.device_modules)
        if args.device is None:
            args.device = default_device()
        resume_auto = args.resume == 'auto'
        if resume_auto:
            args.resume = auto_resume_path(args.output, args.experiment)
        meta_model = check_run(args, self.config, TIMM_ST_TRAIN)
        check_loggers(args)
        st.resume_path = args.resume
        st.folder = run_folder_path(args.output, args.experiment)
        if st.folder is not None:
            st.folder_mode = folder_mode(st.folder, st.resume_path, args.overwrite, resume_auto)
        if resume_auto:
            args.resume = 'auto'  # args.yaml records the command as given: re-running it is idempotent
        self.data_config = data_config(vars(args), meta_model)
        name, root = dataset_location(args.dataset, args.data_dir)
        common = dict(img_mode=image_mode(args.input_img_mode, self.data_config), class_map=args.class_map,
                      download=args.dataset_download, batch_size=args.batch_size)
        self.dataset_train = create_split(name, root, args.train_split, is_training=True, **common)
        self.dataset_eval = create_split(name, root, args.train_split if args.eval_on_train else args.val_split,
                                         **common)
        classes = check_dataset_classes(args, self.dataset_train)
        if args.num_classes is None:
            args.num_classes = classes
        return self

    # --- stage 1: setup ---------------------------------------------------------------------------
    def setup(self) -> bool:
        """Build everything, then create the run folder; False when a run resumed in place is already complete."""
        args = self.args
        args.prefetcher = not args.no_prefetcher
        self.device = utils.init_distributed_device(args)
        self.primary = utils.is_primary(args)
        if args.distributed:
            _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
        utils.random_seed(args.seed, args.rank)
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self._setup_task()
        self._setup_loaders()
        self._setup_optimizer()
        self._setup_resume_and_wrappers()
        if not self._setup_schedule():
            return False
        self._setup_folder()
        return True

    def _setup_task(self) -> None:
        args = self.args
        model = build_model(args, pretrained=args.pretrained, checkpoint_path=args.initial_checkpoint)
        if self.primary:
            _logger.info(f'Data configuration: {self.data_config}')
        if args.grad_checkpointing:
            model.set_grad_checkpointing(enable=True)
        model.to(device=self.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.distributed and args.sync_bn:
            from timm.layers import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
        self.model = model
        self.task = build_task(model, self.config, train_criterion(args).to(self.device), self.device,
                               verbose=self.primary, num_epochs=args.epochs)

    def _setup_loaders(self) -> None:
        from timm.data import FastCollateMixup, Mixup, create_loader
        args, config = self.args, self.data_config
        collate_fn = self.mixup_fn = None
        if mixup_active(args):
            mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                              prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                              label_smoothing=args.smoothing, num_classes=args.num_classes)
            if args.prefetcher:
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                self.mixup_fn = Mixup(**mixup_args)
        common = dict(mean=config['mean'], std=config['std'], num_workers=args.workers, distributed=args.distributed,
                      pin_memory=args.pin_mem, device=self.device, use_prefetcher=args.prefetcher,
                      persistent_workers=args.workers > 0)
        sizes = {} if args.train_img_sizes is None else dict(  # timm >= 1.0.29 (check_run)
            input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
            batch_choice_seed=args.seed)
        self.loader_train = create_loader(
            self.dataset_train, input_size=config['input_size'], batch_size=args.batch_size, is_training=True,
            num_aug_repeats=args.aug_repeats, worker_seeding=args.worker_seeding, collate_fn=collate_fn,
            **augmentation(vars(args), config), **sizes, **common)
        self.eval_batch_size = args.validation_batch_size or args.batch_size
        self.loader_eval = create_loader(
            self.dataset_eval, input_size=config['input_size'], batch_size=self.eval_batch_size,
            is_training=False, interpolation=config['interpolation'], crop_pct=config['crop_pct'], **common)
        self.loader_train, self.loader_eval = guard_prefetcher(self.loader_train), guard_prefetcher(self.loader_eval)
        # every random draw of training keyed by (seed, rank, epoch, batch): exact continuations (seeding.py)
        self.loader_train = seeded_loader(self.loader_train, args.seed, args.rank, args.mixup_off_epoch, self.device)
        self.validate_kwargs = dict(autocast=None, channels_last=args.channels_last, distributed=args.distributed,
                                    max_samples=len(self.dataset_eval))

    def _setup_optimizer(self) -> None:
        from timm.optim import create_optimizer_v2, optimizer_kwargs
        args = self.args
        if not args.lr:  # as timm's train.py, which also records the scaling rule it chose in args
            # with several training sizes timm's scheduled sampler gives the policy-average batch size
            reference_batch = getattr(self.loader_train.batch_sampler, 'average_batch_size', args.batch_size)
            global_batch = reference_batch * args.world_size * args.grad_accum_steps
            ratio = global_batch / args.lr_base_size
            if not args.lr_base_scale:
                args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
            args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
            if self.primary:
                _logger.info(f'Learning rate {args.lr} from lr_base {args.lr_base}, global batch {global_batch}, '
                             f'{args.lr_base_scale} scaling')
        self.optimizer = create_optimizer_v2(self.model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        self.amp_autocast, self.loss_scaler = precision(self.device, args.amp, args.amp_dtype)
        self.validate_kwargs['autocast'] = self.amp_autocast

    def _setup_resume_and_wrappers(self) -> None:
        from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
        args, task, resume_path = self.args, self.task, self.state.resume_path
        self.resume_epoch = None
        if resume_path:
            self.resume_epoch = resume_task_checkpoint(
                task, resume_path, optimizer=None if args.no_resume_opt else self.optimizer,
                loss_scaler=None if args.no_resume_opt else self.loss_scaler, log_info=self.primary)
            self.resume_entry = read_resume(resume_path, args.seed, args.world_size, verbose=self.primary)
        if args.model_ema:
            task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                           device='cpu' if args.model_ema_force_cpu else None)
            if resume_path:
                load_task_ema_checkpoint(task, resume_path)
        if args.torchcompile:
            task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
            if task.has_ema():
                task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
        self.eval_model = task.get_eval_model()
        if args.distributed:
            task.prepare_distributed(device_ids=[self.device], broadcast_buffers=not args.no_ddp_bb)
        self.ema_validated = task.has_ema() and not args.model_ema_force_cpu
        # as train.py: the EMA weights' metric ranks the checkpoints when EMA is validated
        self.metric_key = ('ema_' if self.ema_validated else '') + args.eval_metric

    def _setup_schedule(self) -> bool:
        from timm.scheduler import create_scheduler_v2, scheduler_kwargs
        args, st = self.args, self.state
        self.updates_per_epoch = (len(self.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
        self.lr_scheduler, st.num_epochs = create_scheduler_v2(
            self.optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=self.updates_per_epoch)
        st.start_epoch = args.start_epoch if args.start_epoch is not None else (self.resume_epoch or 0)
        st.end_epoch = min(st.num_epochs, args.stop_epoch) if args.stop_epoch is not None else st.num_epochs
        st.num_updates = st.start_epoch * self.updates_per_epoch
        if self.resume_entry is not None and args.start_epoch is None:  # the checkpoint's position, maybe mid-epoch
            entry = self.resume_entry
            st.start_epoch, st.start_step, st.num_updates = entry['epoch'], entry['step'], entry['num_updates']
            st.eval_metrics = entry.get('eval_metrics')
        if st.folder_mode == 'resume' and st.start_epoch >= st.end_epoch and (
                st.end_epoch < st.num_epochs or (st.folder / 'results.json').is_file()):  # else: finish it now
            self.outcome = RunOutcome(message=f'Nothing to do: {st.folder} is complete ({st.start_epoch} of '
                                              f'{st.end_epoch} epochs done); raise --epochs or --stop-epoch to train '
                                              f'further.')
            return False
        if self.lr_scheduler is not None and st.num_updates > 0:
            if args.sched_on_updates:
                self.lr_scheduler.step_update(st.num_updates)
            else:
                self.lr_scheduler.step(st.start_epoch)
        return True

    def _setup_folder(self) -> None:
        """The first write of the run: everything before can still fail without touching the folder."""
        from timm.models import safe_model_name
        args, st = self.args, self.state
        if st.folder is None:  # a timestamped name, as train.py; it may exist only if started in the same second
            st.folder = Path(args.output or './output/train') / '-'.join([
                time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(self.data_config['input_size'][-1])])
            st.folder_mode = folder_mode(st.folder, st.resume_path, args.overwrite)
        if st.folder_mode == 'resume' and st.start_epoch:
            st.saved_epoch = st.start_epoch - 1
        if not self.primary:
            return
        if st.folder_mode == 'overwrite':
            _logger.info(f'--overwrite: removed the earlier run\'s files from {st.folder}: {clear_run(st.folder)}')
        utils.get_outdir(str(st.folder.parent), st.folder.name)
        quiet_checkpoint_saver()
        self.saver = RunSaver(
            model=self.task.get_trainable_module(), optimizer=self.optimizer, args=args, amp_scaler=self.loss_scaler,
            checkpoint_dir=str(st.folder), recovery_dir=str(st.folder), decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=self.task)
        if st.folder_mode == 'resume':
            restore_saver(self.saver, st.folder, st.resume_path, st.start_epoch)
            rewind(st.folder, st.start_epoch, self.saver.best_epoch, st.resume_path)
        st.best_metric, st.best_epoch = self.saver.best_metric, self.saver.best_epoch
        write_args(st.folder, args)
        self.loggers = MetricLoggers(st.folder, args)
        _logger.info(f'Output: {st.folder}' + (' (continuing the run in place)' if st.folder_mode == 'resume' else ''))

    # --- stages 2 and 3: one training epoch, its evaluation -------------------------------------------
    def train_epoch(self) -> Dict[str, float]:
        """One epoch of training steps (the task told the epoch first); its train_* metrics."""
        epoch = self.state.epoch
        set_loader_epoch(self.loader_train, epoch, self.state.step)
        if hasattr(self.task, 'set_epoch'):
            self.task.set_epoch(epoch)
        metrics = train_one_epoch(self)
        self._distribute_bn()
        return metrics

    def _distribute_bn(self, ema: bool = False) -> None:
        args = self.args
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(self.task.get_trainable_module(ema=ema), args.world_size, args.dist_bn == 'reduce')

    def evaluate(self) -> Dict[str, float]:
        """Validate the full network (and its EMA) after the task's `before_validate`: the run's latest metrics."""
        args = self.args
        if hasattr(self.task, 'before_validate'):
            self.task.before_validate(self.loader_train, amp_autocast=self.amp_autocast)
        metrics = validate(self.eval_model, self.loader_eval, self.device, **self.validate_kwargs)
        if self.ema_validated:
            self._distribute_bn(ema=True)
            ema = validate(self.task.get_eval_model(ema=True), self.loader_eval, self.device, **self.validate_kwargs)
            metrics.update({f'ema_{k}': v for k, v in ema.items()})
        if self.primary:
            on = ' (on TRAINING data: eval_on_train)' if args.eval_on_train else ''
            _logger.info(f'Eval epoch {self.state.epoch}{on}: loss {metrics["loss"]:.4f}  top1 {metrics["top1"]:.3f}'
                         f'  top5 {metrics["top5"]:.3f}')
        self.state.eval_metrics = metrics
        return metrics

    def _end_epoch(self, row: Dict[str, Any], metrics: Optional[Dict[str, float]]) -> None:
        """Record the epoch (summary.csv, loggers), checkpoint it when evaluated, step the schedule."""
        args, st = self.args, self.state
        done = st.epoch + 1
        if self.primary:
            if metrics is not None:
                row.update((f'eval_{k}', v) for k, v in metrics.items())
                if args.eval_on_train:
                    row['eval_split'] = args.train_split
            self.loggers.log_epoch(st.epoch, row)
            if metrics is not None:
                self.saver.entry = resume_entry(self, st.epoch + 1, 0)
                st.best_metric, st.best_epoch = self.saver.save_checkpoint(st.epoch, metric=metrics[self.metric_key])
                st.saved_epoch = st.epoch
                if done in (args.save_epochs or ()):
                    self.saver.save_milestone(done)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step(done, metrics[self.metric_key] if metrics is not None else None)

    def _epochs(self) -> None:
        st, save_epochs = self.state, set(self.args.save_epochs or ())
        for epoch in range(st.start_epoch, st.end_epoch):
            st.epoch, st.step = epoch, st.start_step if epoch == st.start_epoch else 0
            row = OrderedDict((f'train_{k}', v) for k, v in self.train_epoch().items())
            lrs = [g['lr'] for g in self.optimizer.param_groups]
            row['lr'] = sum(lrs) / len(lrs)
            validates = (epoch + 1) % self.args.val_interval == 0 or epoch + 1 in (st.end_epoch, *save_epochs)
            metrics = self.evaluate() if validates else None
            self._end_epoch(row, metrics)
            signum = self.signals.agreed(self.args.distributed, self.device)  # one all-reduce an epoch
            if signum:  # SIGTERM/SIGUSR1 during validation: last.pth.tar is the position unless not validated
                raise stop_for_signal(self, signum, epoch + 1, 0, save=st.saved_epoch != epoch)

    # --- stage 4: finish --------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        """The whole run; raises RunError for input that cannot run (before any work) and TrainingStopped when
        training stops early (non-finite loss, Ctrl-C)."""
        self.check()
        try:
            if not self.setup():
                return self.outcome
            try:
                with self.signals:
                    self._epochs()
            except KeyboardInterrupt:
                raise TrainingStopped(self.stop_message(f'interrupted in epoch {self.state.epoch}'),
                                      exit_code=INTERRUPTED) from None
            return self.finish()
        finally:
            if self.loggers is not None:
                self.loggers.close()
            if getattr(self.args, 'distributed', False) and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def stop_message(self, what: str) -> str:
        st = self.state
        return (f'{what}; {checkpoint_text(st.folder, st.saved_epoch)}. Continue with: '
                f'{resume_command(st.folder, self.argv)}')

    def finish(self) -> RunOutcome:
        """results.json when the schedule is complete; a stopped run (stop_epoch) claims no final result."""
        st = self.state
        if st.end_epoch < st.num_epochs:
            return RunOutcome(message=self.stop_message(f'Stopped after {st.end_epoch} of {st.num_epochs} epochs '
                                                        f'(stop_epoch)') if self.primary else '')
        results = self._final_results()
        if not self.primary:
            return RunOutcome(results)
        write_results(st.folder, results)
        return RunOutcome(results, summary_text(results, st.folder))

    def _final_results(self) -> Dict[str, Any]:
        args, st = self.args, self.state
        results = OrderedDict(
            model=args.model, dataset=args.dataset or args.data_dir, num_classes=args.num_classes,
            epochs=args.epochs, method=describe_method(args.stimulative)[0],
            stimulative=args.stimulative, eval_input_size=list(self.data_config['input_size']),
            eval_crop_pct=self.data_config['crop_pct'], class_names=class_names(self.dataset_train),
            eval_split=args.train_split if args.eval_on_train else args.val_split, eval_on_train=args.eval_on_train,
            full=st.eval_metrics, best_metric=st.best_metric, best_epoch=st.best_epoch,
            world_size=args.world_size,
            device=torch.cuda.get_device_name(self.device) if self.device.type == 'cuda' else 'cpu')
        if args.eval_subnets > 0:
            try:
                model = utils.unwrap_model(self.task.get_trainable_module())
                stages = subnet_stages(model)
            except ValueError as e:
                results['subnets'] = {'count': 0, 'skipped': str(e).split('.')[0]}
            else:
                results['subnets'] = self._evaluate_subnets(model, stages)
        return results

    def _evaluate_subnets(self, model, stages) -> Dict[str, Any]:
        """The final weights' sub-networks, as `timm-st analyze --seed 0` evaluates them (the same code and rules):
        the recipe's space (a CT recipe names its ST twin's), `eval_subnets` members, with the full network's running
        BatchNorm statistics and with each sub-network's own re-estimated on CALIB_IMAGES training images."""
        args, config = self.args, self.config
        space = config.sample_space if config is not None and config.sampler == 'ordered' else 'default'
        plans = subnet_plans(stages, space, args.eval_subnets)
        summary = {'space': space, 'count': len(plans) - 1}
        per_plan = [{'depths': list(p.depths)} for p in plans[1:]]
        calib = calibration_loader(self.dataset_train, vars(args), self.data_config, CALIB_IMAGES, 0,
                                   self.eval_batch_size, args.workers, self.device)
        for bn in ('running', 'recalibrate'):
            if bn == 'recalibrate':
                utils.random_seed(0)  # torch, numpy, random: the calibration batches of `timm-st analyze --seed 0`
            metrics = evaluate_plans(model, plans, self.loader_eval, self.device, bn=bn, calib_loader=calib,
                                     calib_images=CALIB_IMAGES, **self.validate_kwargs)
            stats = subnet_statistics(metrics[0]['top1'], [m['top1'] for m in metrics[1:]])
            for entry, m in zip(per_plan, metrics[1:]):
                entry[bn] = {'top1': m['top1'], 'top5': m['top5']}
            summary[bn] = {'full_top1': stats['full_top1'], 'top1_mean': stats['subnet_mean'],
                           'top1_std': stats['subnet_std'], 'top1_min': stats['subnet_min'],
                           'top1_max': stats['subnet_max'], 'loafing_gap': stats['loafing_gap']}
        summary['recalibrate']['calib_images'] = CALIB_IMAGES
        summary['subnets'] = per_plan
        return summary


def summary_text(results: Dict[str, Any], folder: Path) -> str:
    """The lines `timm-st train` reports at the end of a finished run."""
    full = results['full'] or {}
    subnets = results.get('subnets', {})
    line = f'Full network: top1 {full.get("top1", float("nan")):.2f}%  top5 {full.get("top5", float("nan")):.2f}%'
    if subnets.get('count'):
        line += f'\nSub-networks ({subnets["count"]} of space {subnets["space"]!r}), top1 mean +- std (min, max):'
        for bn, what in (('running', "the full network's BatchNorm statistics"),
                         ('recalibrate', 'their own re-estimated BatchNorm statistics')):
            s = subnets[bn]
            line += (f'\n  {s["top1_mean"]:.2f} +- {s["top1_std"]:.2f}% ({s["top1_min"]:.2f}, {s["top1_max"]:.2f}) '
                     f'with {what}')
    if results.get('eval_on_train'):
        line += f'\n(evaluated on the TRAINING data, split {results["eval_split"]!r}: not held-out accuracy)'
    return f'{line}\nResults: {folder / "results.json"}'
