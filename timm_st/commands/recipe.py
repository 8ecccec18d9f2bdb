"""Recipes and the one validation of a run, for every route.

A recipe is a YAML file whose keys are timm `train.py` argument names, plus a `stimulative:`
section. `build_parser()` declares every timm `train.py` option that `timm-st train` implements,
with the same name, meaning and default. The checks here are shared by `timm-st train` and by
timm's own `train.py` through `timm_st.commands.hook`:

* `check_keys`: every recipe key is one the runner honours (a silently ignored key would make an
  unfair comparison);
* `check_values`: each value fits its option (type, list length, choices); numeric strings, which
  YAML 1.1 reads for `3e-4`, are converted as the command line would;
* `check_run`: the whole run (recipe + command line) before any work: ranges, device, data folder,
  checkpoints, optimizer and scheduler names, and the option combinations (`check_combinations`).

Every refusal is a `RecipeError` whose one-line message names the key or path and the fix.
"""
import argparse
import difflib
import inspect
import math
import os
import textwrap
import warnings
from dataclasses import fields
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import yaml

from ..method.config import DESCRIPTIONS, StimulativeConfig
from ..method.task import StimulativeTask
from .run_folder import build_model, checkpoint_weights, read_checkpoint

__all__ = ['RecipeError', 'build_parser', 'parse_args', 'load_recipe', 'option_names', 'check_keys', 'check_values',
           'check_run', 'check_combinations', 'stimulative_config', 'TIMM_ST_TRAIN', 'TASK_FACTORY']


class RecipeError(ValueError):
    """A recipe or command line that cannot run; the one-line message says what and how to fix it."""

    def __init__(self, message: str):
        super().__init__(' '.join(str(message).split()))


TIMM_ST_TRAIN = 'timm-st train'
# the task factory a recipe names for timm's train.py with patches/ applied; timm-st train builds that task itself
TASK_FACTORY = 'timm_st.commands.hook:create_task'
# options given as key=value pairs on the command line and as a mapping in a recipe
_MAPPING_KEYS = ('model_kwargs', 'opt_kwargs', 'task_kwargs')

_FLAG = dict(action='store_true')


def _kwargs_pairs(option: str, values: Sequence[str]) -> Dict[str, Any]:
    """`key=value ...` (values read as YAML) -> mapping, as timm's ParseKwargs."""
    out = {}
    for item in values:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise RecipeError(f'--{option.replace("_", "-")}: expected key=value, got {item!r}')
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RecipeError(f'--{option.replace("_", "-")}: value of {key!r} is not valid YAML: {value!r}') from None
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
    ('eval_subnets', dict(type=int, default=20,
                          help='sub-networks of the sampling space evaluated at the end (results.json); 0 = off')),
)


def option_names() -> List[str]:
    """The recipe keys `timm-st train` honours besides `stimulative` (timm train.py names)."""
    return [name for name, _ in _OPTIONS]


def _stimulative_help() -> str:
    lines = ["Keys of a recipe's stimulative: section, also settable with --stimulative KEY=VALUE ... "
             '(values are YAML; default in brackets):']
    for f in fields(StimulativeConfig):
        lines += textwrap.wrap(f'{f.name} [{f.default}]: {DESCRIPTIONS[f.name]}', 100,
                               initial_indent='  ', subsequent_indent='      ')
    return '\n'.join(lines)


def build_parser(prog: str = TIMM_ST_TRAIN) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description='Train a timm model with a timm-st recipe (common or stimulative training).',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='recipe YAML')
    for name, kwargs in _OPTIONS:
        parser.add_argument('--' + name.replace('_', '-'), dest=name, **kwargs)
    group = parser.add_argument_group('stimulative training', _stimulative_help())
    group.add_argument('--stimulative', nargs='+', default=None, metavar='KEY=VALUE',
                       help="set single keys of the recipe's stimulative: section (without one: stimulative "
                            'training with the defaults below), e.g. --stimulative num_subnets=2 loss=kl_direction')
    return parser


def load_recipe(path: str) -> Dict[str, Any]:
    """Read a recipe file: a mapping of timm train.py argument names (and `stimulative:`)."""
    if os.path.isdir(path):
        raise RecipeError(f'recipe {path!r} is a folder; pass the path of a recipe YAML file (see recipes/)')
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


# --- keys and values --------------------------------------------------------------------------

def check_keys(keys: Collection[str], known: Collection[str], runner: str,
               timm_st_train_keys: Collection[str] = ()) -> None:
    """Refuse recipe keys the runner will not honour; `timm_st_train_keys`: those `timm-st train` would."""
    unknown = sorted(k for k in keys if k not in known)
    if not unknown:
        return
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        if key in timm_st_train_keys:
            problems.append(f'{key!r} (an option of timm-st train that this runner lacks: upgrade timm\'s train.py '
                            f'to a version that has --{key.replace("_", "-")}, run the recipe with timm-st train, '
                            f'or remove the key)')
        elif close:
            problems.append(f'{key!r} (did you mean {close[0]!r}?)')
        else:
            problems.append(f'{key!r}')
    raise RecipeError(
        f'recipe key(s) {unknown} not supported by {runner}: {", ".join(problems)}. A silently ignored key would train '
        f'something else than the recipe says: fix the spelling (timm train.py option names with underscores, '
        f'e.g. weight_decay) or remove the key.')


def _action_takes_mapping(action: argparse.Action) -> bool:
    return action.dest in _MAPPING_KEYS or type(action).__name__ == 'ParseKwargs'


def _convert(value: Any, to) -> Tuple[bool, Any]:
    """(ok, converted) for one element: numbers for numeric options (numeric strings converted), text for others."""
    if isinstance(value, bool):
        return False, value
    if to is float:
        if isinstance(value, (int, float)):
            return True, value
    elif to is int:
        if isinstance(value, int):
            return True, value
    elif to is None or to is str:
        return isinstance(value, str), value
    if isinstance(value, str):
        try:
            return True, to(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return False, value
    return to not in (int, float), value


def _type_name(to) -> str:
    return {float: 'a number', int: 'an integer', None: 'a string', str: 'a string'}.get(to, 'a value')


def _check_value(name: str, value: Any, action: argparse.Action) -> Any:
    if value is None:
        return None
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise RecipeError(f'recipe key {name!r}: expected true or false, got {value!r}')
        return value
    if _action_takes_mapping(action):
        if not isinstance(value, dict):
            raise RecipeError(f'recipe key {name!r}: expected a mapping (e.g. {{key: value}}), got {value!r}')
        return value
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if isinstance(action.nargs, int) and not (isinstance(value, (list, tuple)) and len(value) == action.nargs):
            raise RecipeError(f'recipe key {name!r}: expected a list of {action.nargs} values, got {value!r}')
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if action.nargs == '+' and not items:
            raise RecipeError(f'recipe key {name!r}: expected a non-empty list, got {value!r}')
        converted = [_convert(v, action.type) for v in items]
        if not all(ok for ok, _ in converted):
            raise RecipeError(f'recipe key {name!r}: expected a list of {_type_name(action.type)}s, got {value!r}')
        value = [v for _, v in converted]
        bad = [v for v in value if action.choices is not None and v not in action.choices]
    else:
        ok, value = _convert(value, action.type)
        if not ok:
            raise RecipeError(f'recipe key {name!r}: expected {_type_name(action.type)}, got {value!r}')
        bad = [value] if action.choices is not None and value not in action.choices else []
    if bad:
        raise RecipeError(f'recipe key {name!r}: got {bad[0]!r}; allowed: {list(action.choices)}')
    return value


def check_values(recipe: Mapping[str, Any], parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Check recipe values against the parser's options (timm-st train's or train.py's) -> converted values.

    As timm's newest train.py config loader: numeric strings become numbers for numeric options,
    a scalar where a fixed-length list is expected and a value outside `choices` are refused.
    """
    actions = {a.dest: a for a in parser._actions}
    return {name: _check_value(name, value, actions[name]) for name, value in recipe.items() if name in actions}


def _check_task_keys(recipe: Dict[str, Any]) -> None:
    """`task`/`task_kwargs` are for timm's patched train.py; here only the task they would build is allowed."""
    task = recipe.pop('task', TASK_FACTORY)
    if task != TASK_FACTORY:
        raise RecipeError(f'recipe key task: {task!r}; timm-st train builds its own task (allowed: {TASK_FACTORY!r})')
    task_kwargs = recipe.pop('task_kwargs', None)
    if task_kwargs:
        raise RecipeError(f'recipe key task_kwargs: {task_kwargs!r}; timm-st train takes ST settings from the '
                          f'stimulative: section (or --stimulative KEY=VALUE) only')


def stimulative_config(section: Any) -> Optional[StimulativeConfig]:
    """A recipe's `stimulative:` section (None: common training) -> validated config."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise RecipeError(f'recipe key stimulative: expected a mapping of stimulative-training settings, '
                          f'got {section!r}')
    try:
        return StimulativeConfig.from_dict(section)
    except ValueError as e:
        raise RecipeError(str(e)) from None


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
    _check_task_keys(recipe)
    section = recipe.pop('stimulative', None)
    check_keys(recipe, option_names(), TIMM_ST_TRAIN)
    if section is not None and not isinstance(section, dict):
        stimulative_config(section)  # refuses it
    parser.set_defaults(**check_values(recipe, parser))
    args = _parse(parser.parse_args, argv)
    for name in ('model_kwargs', 'opt_kwargs'):
        value = getattr(args, name)
        if isinstance(value, list):
            setattr(args, name, _kwargs_pairs(name, value))
    if args.stimulative is not None:  # command-line overrides of single keys
        section = {**(section or {}), **_kwargs_pairs('stimulative', args.stimulative)}
    config = stimulative_config(section)
    args.stimulative = section
    return args, config


# --- the whole run ------------------------------------------------------------------------------

def _fail(message: str) -> None:
    raise RecipeError(message)


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(args, name: str, ok, allowed: str) -> None:
    """Refuse `args.name` (when the runner has the option and it is set) unless `ok(value)`."""
    value = getattr(args, name, None)
    if value is None:
        return
    try:
        good = bool(ok(value))
    except (TypeError, ValueError):
        good = False
    if not good:
        _fail(f'{name} must be {allowed}, got {value!r} (set it in the recipe or with {_flag(name)})')


def _check_ranges(args) -> None:
    def at_least(low):
        return lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= low

    def number(low=0.0, high=math.inf, low_open=False, high_open=False):
        return lambda v: _finite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    def each(ok):
        return lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(ok(x) for x in v)

    for name, low in (('epochs', 1), ('batch_size', 1), ('validation_batch_size', 1), ('grad_accum_steps', 1),
                      ('img_size', 1), ('in_chans', 1), ('num_classes', 1), ('val_interval', 1), ('log_interval', 1),
                      ('workers', 0), ('eval_subnets', 0), ('warmup_epochs', 0), ('cooldown_epochs', 0),
                      ('checkpoint_hist', 1), ('stop_epoch', 1), ('max_nonfinite_steps', 0), ('lr_base_size', 1)):
        _need(args, name, at_least(low), f'>= {low} (an integer)')
    for name in ('input_size',):
        _need(args, name, lambda v: len(v) == 3 and each(at_least(1))(v), 'three integers >= 1 (channels, height, '
                                                                          'width)')
    for name in ('train_img_sizes', 'train_batch_sizes', 'save_epochs'):
        _need(args, name, each(at_least(1)), 'a list of integers >= 1')
    for name in ('lr', 'warmup_lr', 'min_lr', 'weight_decay', 'momentum', 'mixup', 'cutmix', 'lr_noise_pct',
                 'lr_noise_std', 'color_jitter', 'aug_repeats'):
        _need(args, name, number(), 'a finite number >= 0')
    for name in ('lr_base', 'crop_pct', 'clip_grad', 'decay_rate', 'lr_cycle_mul', 'lr_k_decay', 'opt_eps'):
        _need(args, name, number(low_open=True), 'a finite number > 0')
    for name in ('smoothing', 'drop', 'drop_path', 'drop_block'):
        _need(args, name, number(high=1.0, high_open=True), 'a number in [0, 1)')
    for name in ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'color_jitter_prob',
                 'grayscale_prob', 'gaussian_blur_prob'):
        _need(args, name, number(high=1.0), 'a number in [0, 1]')
    _need(args, 'model_ema_decay', number(high=1.0, low_open=True), 'a number in (0, 1]')
    _need(args, 'std', each(number(low_open=True)), 'a list of finite numbers > 0')
    _need(args, 'mean', each(lambda v: _finite(v)), 'a list of finite numbers')
    channels = getattr(args, 'in_chans', None) or (getattr(args, 'input_size', None) or [3])[0]
    for name in ('mean', 'std'):
        value = getattr(args, name, None)
        if value is not None and len(value) not in (1, channels):
            _fail(f'{name}: got {len(value)} values {list(value)} for {channels} input channels; give one value per '
                  f'channel (or one for all) in the recipe or with {_flag(name)}')
    sizes, batches = getattr(args, 'train_img_sizes', None), getattr(args, 'train_batch_sizes', None)
    if batches is not None and sizes is None:
        _fail('train_batch_sizes needs train_img_sizes (one batch size per training size)')
    if batches is not None and len(batches) != len(sizes):
        _fail(f'train_batch_sizes has {len(batches)} values but train_img_sizes {len(sizes)}; give one batch size '
              f'per training size')
    stop, epochs = getattr(args, 'stop_epoch', None), getattr(args, 'epochs', None)
    if stop is not None and epochs is not None and stop > epochs:
        _fail(f'stop_epoch {stop} is after the last epoch ({epochs}); choose 1..{epochs}')


def _check_device(device: Any) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        _fail(f"device {device!r} is not a device PyTorch knows; use 'cpu', 'cuda', 'cuda:N' or 'mps' "
              f'(recipe key device or --device)')
    if dev.type == 'cpu':
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, 'is_available', None)
    if dev.type == 'mps':
        available = torch.backends.mps.is_available
    if available is None or not available():
        _fail(f'device {device!r}: no {dev.type} device is available on this machine; pass --device cpu '
              f'(or run where {dev.type} is available)')
    count = getattr(backend, 'device_count', None)
    if dev.index is not None and count is not None and dev.index >= count():
        _fail(f'device {device!r}: this machine has {count()} {dev.type} device(s) (0..{count() - 1}); '
              f'pass another --device')


_REMOTE_DATASETS = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')


def _split_folder(root: str, split: str) -> Optional[str]:
    """The folder timm's image-folder dataset reads for `split` (timm's own lookup, with its synonyms),
    or None where timm would fall back to `root` itself."""
    from timm.data.dataset_factory import _search_split
    found = _search_split(root, split)
    return None if os.path.normpath(found) == os.path.normpath(root) else found


def _has_image(folder: str) -> bool:
    from timm.data.readers.img_extensions import get_img_extensions
    extensions = get_img_extensions(as_set=True)
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


def _check_data(args, runner: str) -> None:
    dataset = getattr(args, 'dataset', '') or ''
    if dataset == 'digits':
        return
    data_dir = getattr(args, 'data_dir', None) or getattr(args, 'data', None)
    train_split, val_split = getattr(args, 'train_split', 'train'), getattr(args, 'val_split', 'validation')
    if not data_dir:
        _fail(f'no dataset given: pass --data-dir PATH (an image folder with {train_split}/ and {val_split}/ '
              f'splits)' + (', or use --dataset digits for the embedded demo' if runner == TIMM_ST_TRAIN else ''))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        _fail(f'data directory {data_dir!r} is a file, not a folder; pass --data-dir with the folder that holds '
              f'{train_split}/ and {val_split}/')
    if dataset.startswith(_REMOTE_DATASETS):
        return
    if not os.path.isdir(data_dir):
        _fail(f'data directory {data_dir!r} does not exist; pass --data-dir with an image folder containing '
              f'{train_split}/ and {val_split}/')
    eval_on_train = getattr(args, 'eval_on_train', False)
    on_purpose = ('pass --eval-on-train to evaluate on the training images on purpose (labelled so)'
                  if runner == TIMM_ST_TRAIN else 'timm-st train has --eval-on-train to evaluate on the training '
                                                  'images on purpose (labelled so)')
    train_folder = _split_folder(data_dir, train_split)
    if train_folder is None:
        _fail(f'training split {train_split!r} not found in {data_dir!r} (no {train_split}/ folder or timm synonym); '
              f'timm would silently train on the whole folder. Pass --train-split with the folder\'s name')
    if not _has_image(train_folder):
        _fail(f'cannot read dataset at {data_dir!r}: training split folder {train_folder!r} holds no images; put '
              f'<class>/<image> files there')
    if eval_on_train:
        return
    val_folder = _split_folder(data_dir, val_split)
    if val_folder is None:
        _fail(f'validation split {val_split!r} not found in {data_dir!r} (no {val_split}/ folder or timm synonym '
              f'val/, validation/, eval/); timm would silently evaluate on the training images. Add a held-out '
              f'{val_split}/ folder, pass --val-split with its name, or {on_purpose}')
    if os.path.realpath(val_folder) == os.path.realpath(train_folder):
        _fail(f'training and validation splits are the same folder {train_folder!r}; pass a held-out --val-split, '
              f'or {on_purpose}')
    if not _has_image(val_folder):
        _fail(f'cannot read dataset at {data_dir!r}: validation split folder {val_folder!r} holds no images; put '
              f'<class>/<image> files there')


def _folder_classes(args) -> Optional[int]:
    """Classes of an image-folder dataset (its class subfolders), None when not an image folder."""
    dataset = getattr(args, 'dataset', '') or ''
    data_dir = getattr(args, 'data_dir', None) or getattr(args, 'data', None)
    if dataset.startswith(_REMOTE_DATASETS) or dataset == 'digits' or not data_dir or not os.path.isdir(data_dir):
        return None
    folder = _split_folder(data_dir, getattr(args, 'train_split', 'train'))
    if folder is None:
        return None
    return sum(1 for e in os.scandir(folder) if e.is_dir()) or None


def _run_model(args, runner: str):
    """The run's model, built on the meta device (no memory, no weights): fails early on bad model options."""
    num_classes = getattr(args, 'num_classes', None)
    if num_classes is None and runner == TIMM_ST_TRAIN:  # timm-st train takes the dataset's class count
        num_classes = _folder_classes(args)
    try:
        with torch.device('meta'):
            return build_model(vars(args), num_classes=num_classes)
    except ValueError as e:
        _fail(f'{e} (recipe keys model, model_kwargs, num_classes, in_chans)')


def _checkpoint_weights(path: str, key: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        checkpoint = read_checkpoint(path)
        if key == 'initial_checkpoint' and 'state_dict' not in checkpoint:  # timm also loads bare state dicts
            weights = checkpoint.get('model', checkpoint)
            if all(torch.is_tensor(v) for v in weights.values()):
                from timm.models import clean_state_dict
                return clean_state_dict(weights)
        return checkpoint_weights(checkpoint, path)
    except Exception as e:
        _fail(f'{_flag(key)}: {e}; use another checkpoint (e.g. last.pth.tar of a run of this recipe)')


def _check_checkpoints(args, model) -> None:
    for key in ('resume', 'initial_checkpoint'):
        path = getattr(args, key, None)
        if not path or (key == 'resume' and path == 'auto'):
            continue
        if os.path.isdir(path):
            _fail(f'checkpoint {path!r} ({_flag(key)}) is a folder; pass a checkpoint file in it, e.g. '
                  f'{os.path.join(path, "last.pth.tar")}')
        if not os.path.isfile(path):
            _fail(f'checkpoint {path!r} does not exist ({_flag(key)}); check the path (checkpoints are in the run\'s '
                  f'output folder)')
        got = {k: tuple(v.shape) for k, v in _checkpoint_weights(path, key).items()}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shapes = [f'{k} is {list(got[k])} there, {list(expected[k])} here' for k in expected
                  if k in got and got[k] != expected[k]]
        if missing or unexpected or shapes:
            detail = '; '.join(filter(None, [
                f'missing weights {missing[:3]}' + (' ...' if len(missing) > 3 else '') if missing else '',
                f'unexpected weights {unexpected[:3]}' + (' ...' if len(unexpected) > 3 else '') if unexpected else '',
                '; '.join(shapes[:2])]))
            classes = getattr(model, 'num_classes', '?')
            _fail(f'checkpoint {path!r} ({_flag(key)}) does not fit this run\'s model {args.model!r} with {classes} classes ({detail}); '
                  f'use a checkpoint of the same architecture and class count, or fix model / num_classes')


def _check_optimizer(args) -> None:
    from timm.optim import create_optimizer_v2, list_optimizers
    opt = getattr(args, 'opt', None)
    if opt is None:
        return
    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(2, 2))], opt=opt, lr=0.1)
    except Exception as e:
        names = list_optimizers()
        close = difflib.get_close_matches(str(opt).lower().split('_')[-1], names, n=3)
        hint = f'did you mean {close}? ' if close else ''
        _fail(f'optimizer {opt!r} cannot be created by timm {timm.__version__} ({type(e).__name__}: '
              f'{str(e).splitlines()[0] if str(e) else ""}); {hint}timm.optim.list_optimizers() lists the names '
              f'(recipe key opt or --opt)')


_SCHEDULER_CANDIDATES = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant')


def _scheduler_builds(name: str) -> bool:
    """Whether this timm's create_scheduler_v2 builds a scheduler named `name` (1.0.27 returns None for
    an unknown name, newer versions raise)."""
    from timm.scheduler import create_scheduler_v2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        with warnings.catch_warnings():  # e.g. timm's deprecation notice of 'plateau'
            warnings.simplefilter('ignore')
            scheduler, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=10, updates_per_epoch=1)
    except (ValueError, KeyError, TypeError, AssertionError):
        return False
    return scheduler is not None


def _check_scheduler(args) -> None:
    sched = getattr(args, 'sched', None)
    if sched is None or sched == 'none' or _scheduler_builds(sched):
        return
    known = [n for n in _SCHEDULER_CANDIDATES if _scheduler_builds(n)]
    _fail(f'scheduler {sched!r} is not one timm {timm.__version__} builds ({known + ["none"]}); '
          f'fix recipe key sched or --sched')


def check_combinations(args, config: Optional[StimulativeConfig]) -> None:
    """Options that each are valid but do not work together (every route)."""
    if config is None:
        return
    if getattr(args, 'kd_model_name', None) is not None:
        _fail('the recipe has a stimulative: section and kd_model_name is set; train.py would build a '
              'distillation task and ignore stimulative training. Remove one of them.')
    mixup_active = (getattr(args, 'mixup', 0) or 0) > 0 or (getattr(args, 'cutmix', 0) or 0) > 0 or (
        getattr(args, 'cutmix_minmax', None) is not None)
    try:
        config.check_targets(soft_targets=mixup_active)
    except ValueError as e:
        _fail(str(e))
    if config.normalizes_main_logits and getattr(args, 'bce_loss', False):
        _fail(f'stimulative.loss: {config.loss!r} layer-normalises the logits the main criterion sees, and bce_loss '
              f'makes that criterion binary cross-entropy (normalised logits keep every sigmoid near 0.5), a '
              f'combination the method was never run with; use loss: kl with bce_loss, or remove bce_loss')


def _loader_takes_zero_workers() -> bool:
    """Whether timm's create_loader accepts num_workers=0 with its default persistent_workers=True
    (timm before 1.0.29 hands both to torch's DataLoader, which refuses them)."""
    from timm.data import create_loader

    class _One(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.zeros(3, 4, 4), 0

    try:
        create_loader(_One(), input_size=(3, 4, 4), batch_size=1, num_workers=0, use_prefetcher=False)
    except ValueError:
        return False
    return True


def check_run(args: argparse.Namespace, config: Optional[StimulativeConfig], runner: str) -> None:
    """The one validation of a whole run (recipe + command line), before any work; raises RecipeError.

    `runner` is `TIMM_ST_TRAIN` or a description of timm's train.py running the recipe (the hook);
    `args` is that runner's parsed namespace (options a runner lacks are skipped).
    """
    model_name = getattr(args, 'model', None)
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = timm.list_models(f'*{str(model_name).split(".")[0][:6]}*')[:8]
        _fail(f'unknown model {model_name!r}; similar timm models: {close}. '
              f'(timm-st registers resnet20/32/44/56/110_cifar.)')
    _check_ranges(args)
    _check_device(getattr(args, 'device', None))
    _check_data(args, runner)
    model = _run_model(args, runner)
    _check_checkpoints(args, model)
    if config is not None:  # the model has a sub-network adapter and the space fits it
        try:
            StimulativeTask(model, config, num_epochs=getattr(args, 'epochs', None), verbose=False)
        except ValueError as e:
            _fail(str(e))
    _check_optimizer(args)
    _check_scheduler(args)
    check_combinations(args, config)
    if getattr(args, 'train_img_sizes', None) is not None:
        from timm.data import create_loader
        if 'input_size_choices' not in inspect.signature(create_loader).parameters:
            _fail(f'train_img_sizes needs timm >= 1.0.29 (installed: {timm.__version__}); pip install -U timm, '
                  f'or remove the key')
    if runner != TIMM_ST_TRAIN and getattr(args, 'workers', 1) == 0 and not _loader_takes_zero_workers():
        _fail(f'workers: 0 stops timm {timm.__version__}\'s loader in train.py (persistent_workers needs workers > 0); '
              f'pass --workers 1 or more, or run the recipe with timm-st train')
