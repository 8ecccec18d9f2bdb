"""Recipes: YAML files whose keys are timm `train.py` argument names, plus a `stimulative:` section.

`build_parser()` declares every timm `train.py` option that `timm-st train` implements, with the
same name, meaning and default; `parse_args()` reads a recipe, rejects keys it does not support
(a silently ignored key would make an unfair comparison), applies command-line overrides and
validates the `stimulative:` section.
"""
import argparse
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import yaml

from ..method.config import StimulativeConfig
from .run_folder import read_checkpoint

__all__ = ['RecipeError', 'build_parser', 'parse_args', 'load_recipe', 'check_run', 'EXTRA_KEYS']


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the message says what and how to fix it."""


# keys of ours, not timm's: a recipe mapping, and the number of sub-networks evaluated at the end
EXTRA_KEYS = ('stimulative', 'eval_subnets')
# the task factory a recipe names for timm's train.py with patches/ applied; timm-st train builds that task itself
TASK_FACTORY = 'timm_st.commands.hook:create_task'

_FLAG = dict(action='store_true')


def _kwargs_pairs(values: List[str]) -> Dict[str, Any]:
    out = {}
    for item in values:
        key, sep, value = item.partition('=')
        if not sep:
            raise argparse.ArgumentTypeError(f'expected key=value, got {item!r}')
        out[key] = yaml.safe_load(value)
    return out


# (name, argparse kwargs) in timm train.py's groups; defaults are timm's
_OPTIONS: Sequence[Tuple[str, Dict[str, Any]]] = (
    # dataset
    ('data_dir', dict(default=None, help='dataset root (image folder with train/validation splits)')),
    ('dataset', dict(default='', help="timm dataset name ('' = image folder, 'torch/cifar100', ...); 'digits' = "
                                      'the embedded scikit-learn digits demo')),
    ('train_split', dict(default='train')),
    ('val_split', dict(default='validation')),
    ('eval_on_train', dict(default=False, action='store_true',
                           help='evaluate on the training split (no held-out split); every output says so')),
    ('dataset_download', dict(default=False, **_FLAG)),
    ('class_map', dict(default='')),
    ('input_img_mode', dict(default=None)),
    # model
    ('model', dict(default='resnet50')),
    ('pretrained', dict(default=False, **_FLAG)),
    ('initial_checkpoint', dict(default='')),
    ('resume', dict(default='', help="checkpoint to resume (inside the run folder: continue there); 'auto': "
                                      'continue OUTPUT/EXPERIMENT from its last.pth.tar, a no-op when complete')),
    ('no_resume_opt', dict(default=False, **_FLAG)),
    ('num_classes', dict(type=int, default=None)),
    ('gp', dict(default=None)),
    ('img_size', dict(type=int, default=None)),
    ('in_chans', dict(type=int, default=None)),
    ('input_size', dict(type=int, nargs=3, default=None)),
    ('crop_pct', dict(type=float, default=None)),
    ('mean', dict(type=float, nargs='+', default=None)),
    ('std', dict(type=float, nargs='+', default=None)),
    ('interpolation', dict(default='')),
    ('batch_size', dict(type=int, default=128)),
    ('validation_batch_size', dict(type=int, default=None)),
    ('channels_last', dict(default=False, **_FLAG)),
    ('grad_accum_steps', dict(type=int, default=1)),
    ('grad_checkpointing', dict(default=False, **_FLAG)),
    ('model_kwargs', dict(nargs='*', default={}, type=str)),
    ('torchcompile', dict(nargs='?', default=None, const='inductor')),
    ('torchcompile_mode', dict(default=None)),
    # device and precision
    ('device', dict(default=None, help="'cuda' (timm's default) when available, else 'cpu'")),
    ('amp', dict(default=False, **_FLAG)),
    ('amp_dtype', dict(default='float16', choices=('float16', 'bfloat16'))),
    ('no_ddp_bb', dict(default=False, **_FLAG)),
    ('device_modules', dict(nargs='+', default=None)),
    # optimizer
    ('opt', dict(default='sgd')),
    ('opt_eps', dict(type=float, default=None)),
    ('opt_betas', dict(type=float, nargs='+', default=None)),
    ('momentum', dict(type=float, default=0.9)),
    ('weight_decay', dict(type=float, default=2e-5)),
    ('clip_grad', dict(type=float, default=None)),
    ('clip_mode', dict(default='norm')),
    ('layer_decay', dict(type=float, default=None)),
    ('opt_kwargs', dict(nargs='*', default={}, type=str)),
    # learning-rate schedule
    ('sched', dict(default='cosine')),
    ('sched_on_updates', dict(default=False, **_FLAG)),
    ('lr', dict(type=float, default=None)),
    ('lr_base', dict(type=float, default=0.1)),
    ('lr_base_size', dict(type=int, default=256)),
    ('lr_base_scale', dict(default='')),
    ('lr_noise', dict(type=float, nargs='+', default=None)),
    ('lr_noise_pct', dict(type=float, default=0.67)),
    ('lr_noise_std', dict(type=float, default=1.0)),
    ('lr_cycle_mul', dict(type=float, default=1.0)),
    ('lr_cycle_decay', dict(type=float, default=0.5)),
    ('lr_cycle_limit', dict(type=int, default=1)),
    ('lr_k_decay', dict(type=float, default=1.0)),
    ('warmup_lr', dict(type=float, default=1e-5)),
    ('min_lr', dict(type=float, default=0)),
    ('epochs', dict(type=int, default=300)),
    ('stop_epoch', dict(type=int, default=None,
                        help='stop after this many epochs of the full schedule (resume later to continue)')),
    ('save_epochs', dict(type=int, nargs='+', default=None,
                         help='keep milestone-N.pth.tar after N completed epochs (evaluated; never deleted)')),
    ('start_epoch', dict(type=int, default=None)),
    ('decay_milestones', dict(type=int, nargs='+', default=[90, 180, 270])),
    ('decay_epochs', dict(type=float, default=90)),
    ('warmup_epochs', dict(type=int, default=5)),
    ('warmup_prefix', dict(default=False, **_FLAG)),
    ('cooldown_epochs', dict(type=int, default=0)),
    ('patience_epochs', dict(type=int, default=10)),
    ('decay_rate', dict(type=float, default=0.1)),
    # augmentation and regularisation
    ('no_aug', dict(default=False, **_FLAG)),
    ('train_crop_mode', dict(default=None)),
    ('scale', dict(type=float, nargs='+', default=[0.08, 1.0])),
    ('ratio', dict(type=float, nargs='+', default=[3. / 4., 4. / 3.])),
    ('hflip', dict(type=float, default=0.5)),
    ('vflip', dict(type=float, default=0.)),
    ('color_jitter', dict(type=float, default=0.4)),
    ('color_jitter_prob', dict(type=float, default=None)),
    ('grayscale_prob', dict(type=float, default=None)),
    ('gaussian_blur_prob', dict(type=float, default=None)),
    ('aa', dict(default=None)),
    ('aug_repeats', dict(type=float, default=0)),
    ('bce_loss', dict(default=False, **_FLAG)),
    ('bce_sum', dict(default=False, **_FLAG)),
    ('bce_target_thresh', dict(type=float, default=None)),
    ('bce_pos_weight', dict(type=float, default=None)),
    ('reprob', dict(type=float, default=0.)),
    ('remode', dict(default='pixel')),
    ('recount', dict(type=int, default=1)),
    ('resplit', dict(default=False, **_FLAG)),
    ('mixup', dict(type=float, default=0.0)),
    ('cutmix', dict(type=float, default=0.0)),
    ('cutmix_minmax', dict(type=float, nargs='+', default=None)),
    ('mixup_prob', dict(type=float, default=1.0)),
    ('mixup_switch_prob', dict(type=float, default=0.5)),
    ('mixup_mode', dict(default='batch')),
    ('mixup_off_epoch', dict(type=int, default=0)),
    ('smoothing', dict(type=float, default=0.1)),
    ('train_interpolation', dict(default='random')),
    ('drop', dict(type=float, default=0.0)),
    ('drop_path', dict(type=float, default=None)),
    ('drop_block', dict(type=float, default=None)),
    ('train_img_sizes', dict(type=int, nargs='+', default=None,
                             help='training resolution(s), different from the evaluation size')),
    ('train_batch_sizes', dict(type=int, nargs='+', default=None)),
    # batch norm
    ('bn_momentum', dict(type=float, default=None)),
    ('bn_eps', dict(type=float, default=None)),
    ('sync_bn', dict(default=False, **_FLAG)),
    ('dist_bn', dict(default='reduce', choices=('broadcast', 'reduce', ''))),
    # model EMA
    ('model_ema', dict(default=False, **_FLAG)),
    ('model_ema_force_cpu', dict(default=False, **_FLAG)),
    ('model_ema_decay', dict(type=float, default=0.9998)),
    ('model_ema_warmup', dict(default=False, **_FLAG)),
    # misc
    ('seed', dict(type=int, default=42)),
    ('worker_seeding', dict(default='all')),
    ('log_interval', dict(type=int, default=50)),
    ('val_interval', dict(type=int, default=1)),
    ('recovery_interval', dict(type=int, default=0)),
    ('checkpoint_hist', dict(type=int, default=10)),
    ('workers', dict(type=int, default=4)),
    ('pin_mem', dict(default=False, **_FLAG)),
    ('no_prefetcher', dict(default=False, **_FLAG)),
    ('output', dict(default='')),
    ('experiment', dict(default='')),
    ('overwrite', dict(default=False, action='store_true',
                       help='replace the run already in OUTPUT/EXPERIMENT (its run files are deleted first)')),
    ('max_nonfinite_steps', dict(type=int, default=5,
                                 help='stop after this many consecutive steps with a NaN/inf loss (0 = never)')),
    ('eval_metric', dict(default='top1', choices=('top1', 'top5', 'loss'))),
    ('log_wandb', dict(default=False, **_FLAG)),
    ('wandb_project', dict(default=None)),
    ('wandb_tags', dict(nargs='+', default=[])),
    # ours
    ('eval_subnets', dict(type=int, default=10,
                          help='sub-networks of the sampling space evaluated at the end (results.json); 0 = off')),
)
_DEFAULTS = {name: kw.get('default') for name, kw in _OPTIONS}


def build_parser(prog: str = 'timm-st train') -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description='Train a timm model with a timm-st recipe (common or stimulative training).')
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='recipe YAML')
    for name, kwargs in _OPTIONS:
        parser.add_argument('--' + name.replace('_', '-'), dest=name, **kwargs)
    return parser


def load_recipe(path: str) -> Dict[str, Any]:
    """Read a recipe file: a mapping of timm train.py argument names (and `stimulative:`)."""
    if not os.path.isfile(path):
        raise RecipeError(f'recipe {path!r} does not exist; pass the path of a recipe YAML (see recipes/)')
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f'recipe {path!r} is not valid YAML: {e}') from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(f'recipe {path!r} must be a mapping of option names to values, got {type(recipe).__name__}')
    return recipe


def _check_value(name: str, value: Any, kwargs: Dict[str, Any]) -> Any:
    if value is None:
        return value
    expected = kwargs.get('type')
    if kwargs.get('action') == 'store_true':
        ok = isinstance(value, bool)
        what = 'true or false'
    elif kwargs.get('nargs') in ('+', '*', 3) and name not in ('model_kwargs', 'opt_kwargs'):
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        ok = all(_is_type(v, expected) for v in value)
        what = f'a list of {_type_name(expected)}'
    elif name in ('model_kwargs', 'opt_kwargs'):
        ok = isinstance(value, dict)
        what = 'a mapping'
    else:
        ok = _is_type(value, expected)
        what = _type_name(expected)
    if not ok:
        raise RecipeError(f'recipe key {name!r}: expected {what}, got {value!r}')
    if 'choices' in kwargs and value not in kwargs['choices']:
        raise RecipeError(f'recipe key {name!r}: got {value!r}; allowed: {list(kwargs["choices"])}')
    return value


def _is_type(value: Any, expected) -> bool:
    if isinstance(value, bool):
        return expected is None and False
    if expected is float:
        return isinstance(value, (int, float))
    if expected is int:
        return isinstance(value, int)
    return isinstance(value, str)


def _type_name(expected) -> str:
    return {float: 'a number', int: 'an integer'}.get(expected, 'a string')


def _check_task_keys(recipe: Dict[str, Any]) -> None:
    """`task`/`task_kwargs` are for timm's patched train.py; here only the task they would build is allowed."""
    task = recipe.pop('task', TASK_FACTORY)
    if task != TASK_FACTORY:
        raise RecipeError(f'recipe key task: {task!r}; timm-st train builds its own task (allowed: {TASK_FACTORY!r})')
    task_kwargs = recipe.pop('task_kwargs', None)
    if task_kwargs:
        raise RecipeError(f'recipe key task_kwargs: {task_kwargs!r}; timm-st train takes ST settings from the '
                          f'stimulative: section only')


def _parse(parse, argv):
    """argparse exits on a bad command line; turn that into a RecipeError (its message is printed)."""
    try:
        return parse(argv)
    except SystemExit as e:
        if e.code:
            raise RecipeError('invalid command line (see the message above and `timm-st train --help`)') from None
        raise


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, Optional[StimulativeConfig]]:
    """Recipe + command line -> (args, stimulative config or None for common training)."""
    parser = build_parser()
    pre, _ = _parse(parser.parse_known_args, argv)
    recipe = load_recipe(pre.config) if pre.config else {}
    options = dict(_OPTIONS)
    _check_task_keys(recipe)
    unknown = sorted(k for k in recipe if k not in options and k != 'stimulative')
    if unknown:
        raise RecipeError(
            f'recipe key(s) {unknown} not supported by timm-st train (a silently ignored key would make an unfair '
            f'comparison). Check the spelling (timm train.py names with underscores, e.g. weight_decay); for options '
            f'timm-st train does not implement, run timm\'s own train.py with this recipe (see README).')
    stimulative = recipe.pop('stimulative', None)
    if stimulative is not None and not isinstance(stimulative, dict):
        raise RecipeError(f'recipe key stimulative: expected a mapping, got {stimulative!r}')
    for name, value in recipe.items():
        recipe[name] = _check_value(name, value, options[name])
    parser.set_defaults(**recipe)
    args = _parse(parser.parse_args, argv)
    for name in ('model_kwargs', 'opt_kwargs'):
        value = getattr(args, name)
        if isinstance(value, list):
            setattr(args, name, _kwargs_pairs(value))
    try:
        config = StimulativeConfig.from_dict(stimulative) if stimulative is not None else None
    except ValueError as e:
        raise RecipeError(str(e)) from None
    args.stimulative = stimulative
    return args, config


def _fail(message: str) -> None:
    raise RecipeError(message)


def check_run(args: argparse.Namespace, config: Optional[StimulativeConfig], runner: str) -> None:
    """The one validation of a whole run (recipe + command line), before any work; raises RecipeError.

    `runner` names who will run it ('timm-st train' or timm's train.py through the hook) for the messages.
    """
    if not timm.is_model(args.model):
        close = timm.list_models(f'*{args.model.split(".")[0][:6]}*')[:8]
        _fail(f'unknown model {args.model!r}; similar timm models: {close}. '
              f'(timm-st registers resnet20/32/44/56/110_cifar.)')
    if args.dataset != 'digits':
        if not args.data_dir:
            _fail('no dataset given: pass --data-dir PATH (an image folder with train/ and validation/ splits), or '
                  'use --dataset digits for the embedded demo')
        if not args.dataset.startswith(('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')) and not os.path.isdir(args.data_dir):
            _fail(f'data directory {args.data_dir!r} does not exist; pass --data-dir with an image folder '
                  f'containing {args.train_split}/ and {args.val_split}/')
    if args.resume:
        _check_checkpoint(args.resume)
    if args.initial_checkpoint:
        _check_checkpoint(args.initial_checkpoint)
    if args.eval_subnets < 0:
        _fail(f'eval_subnets must be >= 0 (0 = no sub-network evaluation), got {args.eval_subnets}')
    if args.grad_accum_steps < 1:
        _fail(f'grad_accum_steps must be >= 1, got {args.grad_accum_steps}')


def _check_checkpoint(path: str) -> None:
    if not os.path.isfile(path):
        _fail(f'checkpoint {path!r} does not exist; check the path (checkpoints are in the run\'s output folder)')
    try:
        read_checkpoint(path)
    except ValueError as e:
        _fail(f'{e}; use another checkpoint (e.g. last.pth.tar)')
