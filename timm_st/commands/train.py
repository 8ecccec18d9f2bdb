"""`timm-st train`: a lean training loop around timm's own components.

Everything that timm provides is called, not rewritten: dataset and loader factories
(prefetcher, augmentation, mixup/cutmix, repeated augmentation), model factory, optimizer and
scheduler factories, AMP loss scaling, EMA, checkpoint saver and task-checkpoint resume,
distributed init and BN distribution. What is ours: the stimulative task, the recipe checks,
the sub-network evaluation, and the output files (`summary.csv` with sub-network loss, epoch
time and throughput; `results.json` with full-network and sub-network accuracy).
"""
import logging
import os
import shlex
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

import timm
from timm import utils
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, resume_task_checkpoint

from ..analysis.evaluation import evaluate_plans, subnet_plans, subnet_statistics, validate
from ..method.adapters import subnet_stages
from ..method.config import StimulativeConfig, describe_method
from ..method.task import StimulativeTask
from .digits import materialize_digits
from .recipe import RecipeError, check_run, parse_args
from .run_folder import (RUN_FILES, build_model, clear_run, holds_run, read_checkpoint, resumes_in_place,
                         run_folder_path, truncate_summary, write_args, write_results, write_summary_row)

__all__ = ['main', 'train', 'TrainingStopped']

_logger = logging.getLogger(__name__)
# training images on which each sub-network's BatchNorm statistics are re-estimated for results.json (the authors
# re-estimate on about 2,000 images; `timm-st analyze --calib-images` has the same default)
CALIB_IMAGES = 2000


class _Progress:
    """A tqdm bar on a terminal (primary rank), timm-style log lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool, log_interval: int):
        self.bar = None
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.desc, self.total = desc, total
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, index: int, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled and (index % self.log_interval == 0 or index == self.total - 1):
            _logger.info(f'{self.desc} [{index + 1:>4d}/{self.total}]  {text}')

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fail(message: str) -> None:
    raise RecipeError(message)


def _build_datasets(args):
    root, name = args.data_dir, args.dataset
    if name == 'digits':
        root, name = str(materialize_digits(args.data_dir)), ''
    input_img_mode = args.input_img_mode or ('L' if args.in_chans == 1 else 'RGB')  # as timm's train.py
    common = dict(root=root, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=input_img_mode)
    try:
        train = create_dataset(name, split=args.train_split, is_training=True, **common)
        val = create_dataset(name, split=args.train_split if args.eval_on_train else args.val_split,
                             is_training=False, **common)
    except Exception as e:
        _fail(f'cannot read dataset {args.dataset or "image folder"!r} at {root!r}: {e}. An image folder needs '
              f'{args.train_split}/<class>/ and {args.val_split}/<class>/ subfolders with images.')
    if len(train) == 0 or len(val) == 0:
        _fail(f'dataset at {root!r} has {len(train)} training and {len(val)} validation images; both must be > 0')
    return train, val


def _train_size_kwargs(args) -> Dict[str, object]:
    """Training resolution(s) that differ from the evaluation size (timm >= 1.0.29 loaders; `check_run`
    refuses them on an older timm and checks the batch sizes)."""
    if args.train_img_sizes is None:
        return {}
    return dict(input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
                batch_choice_seed=args.seed)


def _dataset_classes(dataset) -> Optional[int]:
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, 'classes', None)
    return len(classes) if classes else None


def _class_names(dataset):
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    classes = getattr(dataset, 'classes', None)
    return list(classes) if classes else None


def _train_criterion(args, mixup_active: bool) -> torch.nn.Module:
    """The training loss timm's train.py builds for the same options."""
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup_active:  # mixup/cutmix make soft targets and apply the smoothing themselves
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss else LabelSmoothingCrossEntropy(
            smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()  # train.py: bce_loss without mixup or smoothing is still cross-entropy


class TrainingStopped(RuntimeError):
    """Training stopped before its end (non-finite loss, Ctrl-C); the message says where to resume from."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _auto_resume(args) -> str:
    """`--resume auto`: the run folder's last.pth.tar, or '' (a fresh run) when it holds no checkpoint yet."""
    folder = run_folder_path(args.output, args.experiment)
    if folder is None:
        _fail('--resume auto continues OUTPUT/EXPERIMENT in place: give the run a name with --experiment NAME')
    last = folder / 'last.pth.tar'
    return str(last) if last.is_file() else ''


def _run_folder_mode(folder: Path, args, resume_path: str, resume_auto: bool) -> str:
    """How this command may use `folder`: 'fresh', 'resume' (continue in place) or 'overwrite'; refuses the rest.

    Runs are never overwritten by accident: a folder that holds a run is used only to continue it (a checkpoint
    inside it) or with the explicit `overwrite` option.
    """
    if not holds_run(folder):
        return 'fresh'
    inside = resumes_in_place(folder, resume_path)
    if inside and args.overwrite:
        _fail(f'--overwrite would delete {resume_path!r}, the checkpoint this run resumes from; drop --overwrite to '
              f'continue the run in place, or resume into another --experiment')
    if inside:
        return 'resume'
    if args.overwrite:
        return 'overwrite'
    if resume_auto and not (folder / 'summary.csv').exists() and not any(folder.glob('*.pth.tar')):
        return 'fresh'  # a run stopped before its first checkpoint: nothing to resume, start it again
    found = sorted(n for n in os.listdir(folder) if n in RUN_FILES or n.endswith('.pth.tar'))
    last = folder / 'last.pth.tar'
    how = f'continue it with --resume {last} (or --resume auto), ' if last.is_file() else ''
    _fail(f'run folder {str(folder)!r} already holds a run ({", ".join(found[:6])}); {how}pass --overwrite to '
          f'replace it, or choose another --experiment')


def _check_run_options(args) -> None:
    """What check_run leaves to this runner: milestones within the schedule, and a timm that writes them."""
    if args.save_epochs is not None:
        bad = [e for e in args.save_epochs if e > args.epochs]
        if bad:
            _fail(f'save_epochs {bad}: milestones are completed-epoch counts within 1..epochs ({args.epochs})')
        if not hasattr(utils.CheckpointSaver, 'save_milestone'):
            _fail(f'save_epochs needs timm >= 1.0.31 (milestone checkpoints; installed: {timm.__version__}); '
                  f'pip install -U timm, or remove save_epochs')


def _restore_saver(saver, folder: Path, resume_path: str, start_epoch: int) -> None:
    """Continue the checkpoint bookkeeping of a run resumed in place (ranked checkpoint-N history, best metric),
    so checkpoint_hist and model_best hold over the whole run."""
    if hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.31 keeps it in each checkpoint
        saver.load_state_dict_from_checkpoint(resume_path)
        return
    # older timm: rebuild it from the kept checkpoints of earlier epochs (each records its epoch and metric)
    kept = []
    for path in folder.glob('checkpoint-*.pth.tar'):
        checkpoint = read_checkpoint(path)
        if checkpoint.get('epoch', start_epoch) < start_epoch and checkpoint.get('metric') is not None:
            kept.append((str(path), checkpoint['metric'], checkpoint['epoch']))
    kept.sort(key=lambda c: c[1], reverse=not saver.decreasing)
    saver.checkpoint_files = [(path, metric) for path, metric, _ in kept]
    if kept:
        saver.best_metric, saver.best_epoch = kept[0][1], kept[0][2]


def _rewind(folder: Path, start_epoch: int, saver) -> None:
    """Before continuing a run in place from epoch `start_epoch`: remove what the epochs being redone wrote
    (their summary rows and checkpoints, a best checkpoint from them, and results.json: the run is no longer
    finished), so that an interrupted continuation leaves a consistent folder."""
    truncate_summary(folder, start_epoch)
    for path in folder.glob('checkpoint-*.pth.tar'):
        if path.name[len('checkpoint-'):-len('.pth.tar')].isdigit() and int(path.name[11:-8]) >= start_epoch:
            path.unlink()
    for path in folder.glob('milestone-*.pth.tar'):
        if path.name[len('milestone-'):-len('.pth.tar')].isdigit() and int(path.name[10:-8]) > start_epoch:
            path.unlink()
    best = folder / 'model_best.pth.tar'
    if best.is_file() and read_checkpoint(best).get('epoch', -1) >= start_epoch:
        kept = folder / f'checkpoint-{saver.best_epoch}.pth.tar' if saver.best_epoch is not None else None
        best.unlink()
        if kept is not None and kept.is_file():
            os.link(kept, best)
    if (folder / 'results.json').exists():
        (folder / 'results.json').unlink()


def _resume_command(folder: Path, argv: Optional[Sequence[str]]) -> str:
    """The command line that continues this run in place."""
    argv = list(sys.argv[1:] if argv is None else argv)
    drop = {'--resume', '--output', '--experiment', '--overwrite'}
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = a != '--overwrite'
            continue
        if a.split('=')[0] in drop:
            continue
        kept.append(a)
    if kept and kept[0] == 'train':
        kept = kept[1:]
    return shlex.join(['timm-st', 'train', *kept, '--output', str(folder.parent), '--experiment', folder.name,
                       '--resume', 'auto'])


def _checkpoint_text(folder: Optional[Path], saved_epoch: Optional[int]) -> str:
    last = folder / 'last.pth.tar' if folder is not None else None
    if last is None or not last.is_file():
        return 'no checkpoint was written yet'
    return f'last checkpoint: {last}' + (f' (end of epoch {saved_epoch})' if saved_epoch is not None else '')


def train(args, config: Optional[StimulativeConfig], argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run a training job; returns the final results (also written to results.json).

    Raises RecipeError for input that cannot run (before any work) and TrainingStopped when training stops early
    (non-finite loss, Ctrl-C).
    """
    utils.setup_default_logging()
    if args.device_modules:
        import importlib
        for module in args.device_modules:
            importlib.import_module(module)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    resume_auto = args.resume == 'auto'
    if resume_auto:
        args.resume = _auto_resume(args)
    check_run(args, config, runner='timm-st train')
    _check_run_options(args)
    resume_path = args.resume
    folder = run_folder_path(args.output, args.experiment)
    folder_mode = _run_folder_mode(folder, args, resume_path, resume_auto) if folder is not None else None
    if resume_auto:
        args.resume = 'auto'  # args.yaml records the command as given: re-running it is idempotent
    dataset_train, dataset_eval = _build_datasets(args)
    num_data_classes = _dataset_classes(dataset_train)
    if args.num_classes is None:
        args.num_classes = num_data_classes
    elif num_data_classes is not None and num_data_classes != args.num_classes:
        _fail(f'num_classes is {args.num_classes} but the dataset has {num_data_classes} classes; '
              f'fix num_classes in the recipe or --num-classes')

    args.prefetcher = not args.no_prefetcher
    device = utils.init_distributed_device(args)
    primary = utils.is_primary(args)
    if args.aug_repeats and not args.distributed:
        _fail(f'aug_repeats {args.aug_repeats}: repeated augmentation needs a distributed run (torchrun); '
              f'for a single process override it with --aug-repeats 0')
    if args.distributed:
        _logger.info(f'Distributed training: process {args.rank} of {args.world_size}, device {args.device}.')
    utils.random_seed(args.seed, args.rank)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    model = build_model(args, pretrained=args.pretrained, checkpoint_path=args.initial_checkpoint)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    criterion = _train_criterion(args, mixup_active).to(device)
    if config is not None:
        try:  # check_run has built this task on the meta device, so this normally passes
            task = StimulativeTask(model, config, criterion=criterion, num_epochs=args.epochs, device=device,
                                   verbose=primary)
        except ValueError as e:
            _fail(str(e))
    else:
        task = ClassificationTask(model, criterion=criterion, device=device, verbose=primary)

    collate_fn, mixup_fn = None, None
    if mixup_active:
        mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                          prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                          label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config['interpolation']
    common = dict(mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                  distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                  use_prefetcher=args.prefetcher, persistent_workers=args.workers > 0)
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob,
        grayscale_prob=args.grayscale_prob, gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats, interpolation=train_interpolation, worker_seeding=args.worker_seeding,
        collate_fn=collate_fn, **_train_size_kwargs(args), **common)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'],
        batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    eval_limit = len(dataset_eval)

    if not args.lr:  # as timm's train.py, which also records the scaling rule it chose in args
        # with several training sizes timm's scheduled sampler gives the policy-average batch size
        reference_batch = getattr(loader_train.batch_sampler, 'average_batch_size', args.batch_size)
        global_batch = reference_batch * args.world_size * args.grad_accum_steps
        ratio = global_batch / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        args.lr = args.lr_base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
        if primary:
            _logger.info(f'Learning rate {args.lr} from lr_base {args.lr_base}, global batch {global_batch}, '
                         f'{args.lr_base_scale} scaling')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)

    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler(device=device.type)

    resume_epoch = None
    if resume_path:
        resume_epoch = resume_task_checkpoint(
            task, resume_path, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if resume_path:
            from timm.task import load_task_ema_checkpoint
            load_task_ema_checkpoint(task, resume_path)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = task.get_eval_model()
    if args.distributed:
        task.prepare_distributed(device_ids=[device], broadcast_buffers=not args.no_ddp_bb)


    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    end_epoch = min(num_epochs, args.stop_epoch) if args.stop_epoch is not None else num_epochs
    if folder_mode == 'resume' and start_epoch >= end_epoch:
        print(f'Nothing to do: {folder} is complete ({start_epoch} of {end_epoch} epochs done); '
              f'raise --epochs or --stop-epoch to train further.', flush=True)
        return {}
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    output_dir, saver = None, None
    if folder is None:  # a timestamped name, as train.py; it may exist only if started in the same second
        folder = Path(args.output or './output/train') / '-'.join([
            time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
        folder_mode = _run_folder_mode(folder, args, resume_path, resume_auto)
    if primary:
        # the first write of the run: everything above can still fail without touching the folder
        if folder_mode == 'overwrite':
            removed = clear_run(folder)
            _logger.info(f'--overwrite: removed the earlier run\'s files from {folder}: {removed}')
        output_dir = utils.get_outdir(str(folder.parent), folder.name)
        saver = utils.CheckpointSaver(
            model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=task)
        if folder_mode == 'resume':
            _restore_saver(saver, folder, resume_path, start_epoch)
            _rewind(folder, start_epoch, saver)
        write_args(output_dir, args)
        _logger.info(f'Output: {output_dir}' + (' (continuing the run in place)' if folder_mode == 'resume' else ''))
    wandb = _init_wandb(args, output_dir) if primary and args.log_wandb else None

    validate_kwargs = dict(autocast=amp_autocast, channels_last=args.channels_last, distributed=args.distributed,
                           max_samples=eval_limit)
    ema_validated = task.has_ema() and not args.model_ema_force_cpu
    metric_key = ('ema_' if ema_validated else '') + args.eval_metric  # as train.py: EMA metric when EMA is on
    milestones = set(args.save_epochs or ())
    best_metric = saver.best_metric if saver is not None else None
    best_epoch = saver.best_epoch if saver is not None else None
    saved_epoch = resume_epoch - 1 if folder_mode == 'resume' and resume_epoch else None
    eval_metrics = None
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, end_epoch):
            if hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            if isinstance(task, StimulativeTask):
                task.set_epoch(epoch)
            train_metrics = _train_one_epoch(
                epoch, num_epochs, task, loader_train, optimizer, args, device, lr_scheduler, amp_autocast,
                loss_scaler, mixup_fn, saver, folder, saved_epoch)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            lrs = [g['lr'] for g in optimizer.param_groups]
            row = OrderedDict((f'train_{k}', v) for k, v in train_metrics.items())
            row['lr'] = sum(lrs) / len(lrs)
            done = epoch + 1
            if done % args.val_interval != 0 and done != end_epoch and done not in milestones:
                if primary:  # a row without validation: its eval columns stay empty
                    write_summary_row(output_dir, epoch, row)
                if lr_scheduler is not None:
                    lr_scheduler.step(done, metric=None)
                continue
            if isinstance(task, StimulativeTask):
                task.before_validate(loader_train, amp_autocast)
            eval_metrics = validate(eval_model, loader_eval, device, **validate_kwargs)
            if ema_validated:
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
                ema_metrics = validate(task.get_eval_model(ema=True), loader_eval, device, **validate_kwargs)
                eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
            if primary:
                on = ' (on TRAINING data: eval_on_train)' if args.eval_on_train else ''
                _logger.info(f'Eval epoch {epoch}{on}: loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:.3f}'
                             f'  top5 {eval_metrics["top5"]:.3f}')
                row.update((f'eval_{k}', v) for k, v in eval_metrics.items())
                if args.eval_on_train:
                    row['eval_split'] = args.train_split
                write_summary_row(output_dir, epoch, row)
                if wandb is not None:
                    wandb.log({'epoch': epoch, **row})
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[metric_key])
                saved_epoch = epoch
                if done in milestones:
                    saver.save_milestone(done)
            if lr_scheduler is not None:
                lr_scheduler.step(done, eval_metrics[metric_key])
    except KeyboardInterrupt:
        if args.distributed:
            torch.distributed.destroy_process_group()
        raise TrainingStopped(
            f'interrupted in epoch {epoch}; {_checkpoint_text(folder, saved_epoch)}. Continue with: '
            f'{_resume_command(folder, argv)}', exit_code=130) from None

    if end_epoch < num_epochs:  # stop_epoch: the run is not finished, nothing claims a final result
        if primary:
            print(f'Stopped after {end_epoch} of {num_epochs} epochs (stop_epoch); {_checkpoint_text(folder, saved_epoch)}. '
                  f'Continue with: {_resume_command(folder, argv)}', flush=True)
        if args.distributed:
            torch.distributed.destroy_process_group()
        return {}
    results = _final_results(args, config, task, eval_metrics, loader_train, loader_eval, device, validate_kwargs,
                             best_metric, best_epoch, dataset_train, data_config)
    if primary:
        write_results(output_dir, results)
        _print_summary(results, output_dir)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


def _nonfinite_stop(epoch: int, step: int, limit: int, folder: Optional[Path], saved_epoch: Optional[int]):
    return TrainingStopped(
        f'the training loss was NaN or inf for {limit} consecutive steps (epoch {epoch}, step {step}); training '
        f'stopped and nothing after the last checkpoint was saved ({_checkpoint_text(folder, saved_epoch)}). Lower the '
        f'learning rate (or check the data, amp, clip_grad) and resume from that checkpoint with --resume',
        exit_code=1)


def _train_one_epoch(epoch, num_epochs, task, loader, optimizer, args, device, lr_scheduler, amp_autocast,
                     loss_scaler, mixup_fn, saver, folder, saved_epoch) -> Dict[str, float]:
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False
    task.get_trainable_module().train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum - 1) // accum
    last_group_start = num_batches - num_batches % accum
    num_updates = epoch * updates_per_epoch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    subnet_sum = torch.zeros((), dtype=torch.float64, device=device)
    # non-finite guard on the device: no host sync per step; read where the progress line syncs anyway
    limit = args.max_nonfinite_steps
    streak = torch.zeros((), dtype=torch.int64, device=device)
    stop_step = torch.full((), -1, dtype=torch.int64, device=device)
    num_samples = num_subnet_samples = 0
    progress = _Progress(num_batches, f'Train {epoch}/{num_epochs}', utils.is_primary(args), args.log_interval)
    start = time.time()
    optimizer.zero_grad()
    for batch_idx, (x, y) in enumerate(loader):
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        steps_in_group = num_batches % accum if batch_idx >= last_group_start else accum
        if not args.prefetcher:
            x, y = x.to(device), y.to(device)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = nullcontext() if need_update or not args.distributed else task.no_sync()
        with sync:
            with amp_autocast():
                loss = task(x, y)['loss']
            if steps_in_group > 1:
                loss /= steps_in_group
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                            need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(task.get_clip_parameters(exclude_head='agc' in args.clip_mode),
                                                 value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        batch_size = x.shape[0]
        loss_sum += loss.detach().double() * steps_in_group * batch_size
        if limit:  # the unscaled loss: fp16 loss-scale overflows (skipped steps) are not counted
            streak = torch.where(torch.isfinite(loss.detach()), torch.zeros_like(streak), streak + 1)
            stop_step = torch.where((stop_step < 0) & (streak >= limit), torch.full_like(stop_step, batch_idx),
                                    stop_step)
        num_samples += batch_size
        subnet_loss = getattr(task, 'subnet_loss', None)
        if subnet_loss is not None:
            subnet_sum += subnet_loss.double() * batch_size
            num_subnet_samples += batch_size
        if need_update:
            num_updates += 1
            optimizer.zero_grad()
            task.update_ema(step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
            update_idx = batch_idx // accum
            if saver is not None and args.recovery_interval and (update_idx + 1) % args.recovery_interval == 0:
                if not limit or stop_step.item() < 0:  # as train.py; never a recovery point after a NaN/inf loss
                    saver.save_recovery(epoch, batch_idx=update_idx)
        check = batch_idx % progress.log_interval == 0 or batch_idx == num_batches - 1
        if limit and check:
            if args.distributed:  # every rank stops together
                torch.distributed.all_reduce(stop_step, op=torch.distributed.ReduceOp.MAX)
            if stop_step.item() >= 0:
                progress.close()
                raise _nonfinite_stop(epoch, int(stop_step.item()), limit, folder, saved_epoch)
        if progress.enabled and (progress.bar is not None or check):
            lr = optimizer.param_groups[0]['lr']
            progress.update(batch_idx, f'loss {loss_sum.item() / num_samples:.4f}  lr {lr:.3e}')
    progress.close()
    elapsed = time.time() - start
    totals = torch.tensor([loss_sum.item(), num_samples, subnet_sum.item(), num_subnet_samples],
                          dtype=torch.float64, device=device)
    if args.distributed:
        torch.distributed.all_reduce(totals)
    metrics = OrderedDict(loss=(totals[0] / totals[1].clamp_min(1)).item())
    if isinstance(task, StimulativeTask):
        metrics['subnet_loss'] = (totals[2] / totals[3]).item() if totals[3] > 0 else float('nan')
    metrics['epoch_time'] = elapsed
    metrics['img_per_sec'] = totals[1].item() / max(elapsed, 1e-9)
    return metrics


def _final_results(args, config, task, eval_metrics, loader_train, loader_eval, device, validate_kwargs,
                   best_metric, best_epoch, dataset_train, data_config) -> Dict[str, object]:
    results = OrderedDict(
        model=args.model, dataset=args.dataset or args.data_dir, num_classes=args.num_classes,
        epochs=args.epochs, method=describe_method(args.stimulative)[0],
        stimulative=args.stimulative, eval_input_size=list(data_config['input_size']),
        eval_crop_pct=data_config['crop_pct'], class_names=_class_names(dataset_train),
        eval_split=args.train_split if args.eval_on_train else args.val_split, eval_on_train=args.eval_on_train,
        full=eval_metrics, best_metric=best_metric, best_epoch=best_epoch,
        world_size=args.world_size, device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')
    if args.eval_subnets > 0:
        try:
            model = utils.unwrap_model(task.get_trainable_module())
            stages = subnet_stages(model)
        except ValueError as e:
            results['subnets'] = {'count': 0, 'skipped': str(e).split('.')[0]}
        else:
            results['subnets'] = _evaluate_subnets(args, config, model, stages, loader_train, loader_eval, device,
                                                   validate_kwargs)
    return results


def _evaluate_subnets(args, config, model, stages, loader_train, loader_eval, device, validate_kwargs):
    """The final weights' sub-networks, as `timm-st analyze` evaluates them: the recipe's space (a CT
    recipe names its ST twin's), `eval_subnets` members drawn with seed 0 (the same for both twins),
    with the full network's running BatchNorm statistics and with each sub-network's own statistics
    re-estimated on CALIB_IMAGES images of the training loader (its augmentation)."""
    space = config.sample_space if config is not None and config.sampler == 'ordered' else 'default'
    plans = subnet_plans(stages, space, args.eval_subnets)
    summary = {'space': space, 'count': len(plans) - 1}
    per_plan = [{'depths': list(p.depths)} for p in plans[1:]]
    for bn in ('running', 'recalibrate'):
        metrics = evaluate_plans(model, plans, loader_eval, device, bn=bn, calib_loader=loader_train,
                                 calib_images=CALIB_IMAGES, **validate_kwargs)
        stats = subnet_statistics(metrics[0]['top1'], [m['top1'] for m in metrics[1:]])
        for entry, m in zip(per_plan, metrics[1:]):
            entry[bn] = {'top1': m['top1'], 'top5': m['top5']}
        summary[bn] = {'full_top1': stats['full_top1'], 'top1_mean': stats['subnet_mean'],
                       'top1_std': stats['subnet_std'], 'top1_min': stats['subnet_min'],
                       'top1_max': stats['subnet_max'], 'loafing_gap': stats['loafing_gap']}
    summary['recalibrate']['calib_images'] = CALIB_IMAGES
    summary['subnets'] = per_plan
    return summary


def _print_summary(results, output_dir) -> None:
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
    print(f'{line}\nResults: {os.path.join(output_dir, "results.json")}', flush=True)


def _init_wandb(args, output_dir):
    try:
        import wandb
    except ImportError:
        _logger.warning('log_wandb is set but wandb is not installed (pip install wandb); not logging to wandb.')
        return None
    wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=vars(args),
               tags=args.wandb_tags)
    return wandb


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 input refused before any work, 1 training stopped (non-finite loss), 130 Ctrl-C."""
    try:
        args, config = parse_args(argv)
        train(args, config, argv)
    except RecipeError as e:
        print(f'timm-st train: error: {e}', file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f'timm-st train: {"error: " if e.exit_code != 130 else ""}{e}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print('timm-st train: interrupted before training started; nothing was trained', file=sys.stderr)
        return 130
    return 0
