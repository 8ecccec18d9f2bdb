"""`timm-st train`: a lean training loop around timm's own components.

Everything that timm provides is called, not rewritten: dataset and loader factories
(prefetcher, augmentation, mixup/cutmix, repeated augmentation), model factory, optimizer and
scheduler factories, AMP loss scaling, EMA, checkpoint saver and task-checkpoint resume,
distributed init and BN distribution. What is ours: the stimulative task, the recipe checks,
the sub-network evaluation, and the output files (`summary.csv` with sub-network loss, epoch
time and throughput; `results.json` with full-network and sub-network accuracy).
"""
import inspect
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import yaml

import timm
from timm import utils
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import ClassificationTask, resume_task_checkpoint

from ..analysis.evaluation import evaluate_subnets, sample_eval_plans, validate
from ..method.adapters import subnet_stages
from ..method.config import StimulativeConfig
from ..method.task import StimulativeTask
from .digits import materialize_digits
from .recipe import RecipeError, check_run, parse_args

__all__ = ['main', 'train']

_logger = logging.getLogger(__name__)


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
        val = create_dataset(name, split=args.val_split, is_training=False, **common)
    except Exception as e:
        _fail(f'cannot read dataset {args.dataset or "image folder"!r} at {root!r}: {e}. An image folder needs '
              f'{args.train_split}/<class>/ and {args.val_split}/<class>/ subfolders with images.')
    if len(train) == 0 or len(val) == 0:
        _fail(f'dataset at {root!r} has {len(train)} training and {len(val)} validation images; both must be > 0')
    return train, val


def _train_size_kwargs(args) -> Dict[str, object]:
    """Training resolution(s) that differ from the evaluation size (timm >= 1.0.29 loaders)."""
    if args.train_img_sizes is None:
        if args.train_batch_sizes is not None:
            _fail('train_batch_sizes needs train_img_sizes (one batch size per training size)')
        return {}
    if 'input_size_choices' not in inspect.signature(create_loader).parameters:
        _fail(f'train_img_sizes needs timm >= 1.0.29 (installed: {timm.__version__}); pip install -U timm')
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
    return BinaryCrossEntropy(**bce) if args.bce_loss else torch.nn.CrossEntropyLoss()


def train(args, config: Optional[StimulativeConfig]) -> Dict[str, object]:
    """Run a training job; returns the final results (also written to results.json)."""
    utils.setup_default_logging()
    if args.device_modules:
        import importlib
        for module in args.device_modules:
            importlib.import_module(module)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    check_run(args, config, runner='timm-st train')
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

    model = timm.create_model(
        args.model, pretrained=args.pretrained, in_chans=args.in_chans, num_classes=args.num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
        global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
        checkpoint_path=args.initial_checkpoint or None, **args.model_kwargs)
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
        try:  # soft targets for a hard-label loss, a model without adapter, or a space that does not fit it
            config.check_targets(soft_targets=mixup_active)
            task = StimulativeTask(model, config, criterion=criterion, num_epochs=args.epochs, device=device,
                                   verbose=primary)
        except ValueError as e:
            _fail(str(e))
    else:
        task = ClassificationTask(model, criterion=criterion, device=device, verbose=primary)

    if not args.lr:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        ratio = global_batch / args.lr_base_size
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
        if primary:
            _logger.info(f'Learning rate {args.lr} from lr_base {args.lr_base}, global batch {global_batch}, {scale} scaling')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)

    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler(device=device.type)

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if args.resume:
            from timm.task import load_task_ema_checkpoint
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = task.get_eval_model()
    if args.distributed:
        task.prepare_distributed(device_ids=[device], broadcast_buffers=not args.no_ddp_bb)

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

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    output_dir, saver = None, None
    if primary:
        exp_name = args.experiment or '-'.join([
            time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
        output_dir = utils.get_outdir(args.output or './output/train', exp_name)
        saver = utils.CheckpointSaver(
            model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=task)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(vars(args), f, default_flow_style=False)
        _logger.info(f'Output: {output_dir}')
    wandb = _init_wandb(args, output_dir) if primary and args.log_wandb else None

    validate_kwargs = dict(autocast=amp_autocast, channels_last=args.channels_last, distributed=args.distributed,
                           max_samples=eval_limit)
    best_metric, best_epoch, eval_metrics = None, None, None
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        if isinstance(task, StimulativeTask):
            task.set_epoch(epoch)
        train_metrics = _train_one_epoch(
            epoch, num_epochs, task, loader_train, optimizer, args, device, lr_scheduler, amp_autocast,
            loss_scaler, mixup_fn, saver)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        last = epoch + 1 == num_epochs
        if (epoch + 1) % args.val_interval != 0 and not last:
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, metric=None)
            continue
        if isinstance(task, StimulativeTask):
            task.before_validate(loader_train, amp_autocast)
        eval_metrics = validate(eval_model, loader_eval, device, **validate_kwargs)
        if task.has_ema() and not args.model_ema_force_cpu:
            ema_metrics = validate(task.get_eval_model(ema=True), loader_eval, device, **validate_kwargs)
            eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        if primary:
            _logger.info(f'Eval epoch {epoch}: loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:.3f}  '
                         f'top5 {eval_metrics["top5"]:.3f}')
            lrs = [g['lr'] for g in optimizer.param_groups]
            utils.update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                                 lr=sum(lrs) / len(lrs), write_header=best_metric is None and epoch == start_epoch)
            if wandb is not None:
                wandb.log({'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
                           **{f'eval_{k}': v for k, v in eval_metrics.items()}})
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])

    results = _final_results(args, config, task, eval_model, eval_metrics, loader_eval, device, validate_kwargs,
                             best_metric, best_epoch, dataset_train, data_config)
    if primary:
        with open(os.path.join(output_dir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=2)
        _print_summary(results, output_dir)
    if args.distributed:
        torch.distributed.destroy_process_group()
    return results


def _train_one_epoch(epoch, num_epochs, task, loader, optimizer, args, device, lr_scheduler, amp_autocast,
                     loss_scaler, mixup_fn, saver) -> Dict[str, float]:
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
        if progress.enabled and (progress.bar is not None or batch_idx % progress.log_interval == 0
                                 or batch_idx == num_batches - 1):
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


def _final_results(args, config, task, eval_model, eval_metrics, loader_eval, device, validate_kwargs,
                   best_metric, best_epoch, dataset_train, data_config) -> Dict[str, object]:
    results = OrderedDict(
        model=args.model, dataset=args.dataset or args.data_dir, num_classes=args.num_classes,
        epochs=args.epochs, method=('common' if config is None or config.num_subnets == 0 else 'stimulative'),
        stimulative=args.stimulative, eval_input_size=list(data_config['input_size']),
        eval_crop_pct=data_config['crop_pct'], class_names=_class_names(dataset_train),
        full=eval_metrics, best_metric=best_metric, best_epoch=best_epoch,
        world_size=args.world_size, device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu')
    space = 'default'
    if config is not None and config.sampler == 'ordered':
        space = config.sample_space
    if args.eval_subnets > 0:
        try:
            model = utils.unwrap_model(task.get_trainable_module())
            stages = subnet_stages(model)
        except ValueError as e:
            results['subnets'] = {'count': 0, 'skipped': str(e).split('.')[0]}
        else:
            plans = sample_eval_plans(stages, space, args.eval_subnets)
            results['subnets'] = {'space': space, **evaluate_subnets(model, plans, loader_eval, device,
                                                                     **validate_kwargs)}
    return results


def _print_summary(results, output_dir) -> None:
    full = results['full'] or {}
    subnets = results.get('subnets', {})
    line = f'Full network: top1 {full.get("top1", float("nan")):.2f}%  top5 {full.get("top5", float("nan")):.2f}%'
    if subnets.get('count'):
        line += (f'\nSub-networks ({subnets["count"]} of space {subnets["space"]!r}): top1 '
                 f'{subnets["top1_mean"]:.2f} +- {subnets["top1_std"]:.2f}% '
                 f'(min {subnets["top1_min"]:.2f}, max {subnets["top1_max"]:.2f})')
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
    try:
        args, config = parse_args(argv)
        train(args, config)
    except RecipeError as e:
        print(f'timm-st train: error: {e}', file=sys.stderr)
        return 2
    return 0
