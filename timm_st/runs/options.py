"""Options: the one table of `timm-st train`'s options, and everything derived from it.

Every option is a timm `train.py` option (same name, meaning and default) or one of ours; the table
says how it parses (argparse keywords), its valid range, its scope and, for training augmentation, the
`timm.data.create_loader` argument it sets. From it come the parser (`build_parser`), the range checks
of every route (`check_ranges`), every training loader's augmentation (`augmentation`), the keys a
published recipe leaves out (`LOCAL_KEYS`) and the resume command (`folder.resume_command`, `RUN_SCOPED`).
"""
import argparse
import math
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional

from ..analysis.tree import CALIB_IMAGES
from .errors import RunError
from .folder import TIMM_ST_TRAIN

__all__ = ['Option', 'Range', 'OPTIONS', 'option_names', 'build_parser', 'check_ranges', 'augmentation',
           'takes_value', 'flag', 'LOCAL_KEYS', 'RUN_SCOPED', 'CALIB_IMAGES']


def flag(name: str) -> str:
    """The command-line flag of option `name`."""
    return '--' + name.replace('_', '-')


@dataclass(frozen=True)
class Range:
    """The valid values of an option: `ok(value)`, and how a refusal describes them."""
    ok: Callable[[Any], bool]
    allowed: str


@dataclass(frozen=True)
class Option:
    """One option. `scope`: 'recipe' (part of what is trained), 'machine' (this machine's paths, devices and
    logging: left out of a published recipe) or 'run' (names this run's files: left out of a published recipe and
    of the resume command, which names them itself). `loader`: the create_loader argument of an augmentation."""
    name: str
    spec: Dict[str, Any] = field(default_factory=dict)
    valid: Optional[Range] = None
    scope: str = 'recipe'
    loader: Optional[str] = None

    @property
    def flag(self) -> str:
        return flag(self.name)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(low: int) -> Range:
    return Range(lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= low, f'>= {low} (an integer)')


def _num(allowed: str, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(lambda v: _finite(v) and (v > 0 if low_open else v >= 0) and (v < high if high_open else v <= high),
                 allowed)


def _each(item: Range, allowed: str) -> Range:
    return Range(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(item.ok(x) for x in v), allowed)


NONNEG, POSITIVE = _num('a finite number >= 0'), _num('a finite number > 0', low_open=True)
FRACTION, PROBABILITY = _num('a number in [0, 1)', high=1.0, high_open=True), _num('a number in [0, 1]', high=1.0)
INTS = _each(_int(1), 'a list of integers >= 1')


def _o(name: str, default: Any = None, valid: Optional[Range] = None, scope: str = 'recipe',
       loader: Optional[str] = None, **spec) -> Option:
    return Option(name, dict(default=default, **spec), valid, scope, loader)


def _f(name: str, scope: str = 'recipe', loader: Optional[str] = None, **spec) -> Option:
    return Option(name, dict(default=False, action='store_true', **spec), None, scope, loader)


# in timm train.py's groups; defaults are timm's
OPTIONS = (
    # dataset
    _o('data_dir', scope='machine', help='dataset root (image folder with train/validation splits)'),
    _o('dataset', '', help="timm dataset name ('' = image folder, 'torch/cifar100', ...); 'digits' = the embedded "
                           'scikit-learn digits demo'),
    _o('train_split', 'train'), _o('val_split', 'validation'),
    _f('eval_on_train', help='evaluate on the training split (no held-out split); every output says so'),
    _f('dataset_download'), _o('class_map', ''), _o('input_img_mode'),
    # model
    _o('model', 'resnet50'), _f('pretrained'), _o('initial_checkpoint', ''),
    _o('resume', '', scope='run', help="checkpoint to resume (inside the run folder: continue there); 'auto': "
                                       'continue OUTPUT/EXPERIMENT from its last.pth.tar, a no-op when complete'),
    _f('no_resume_opt'), _o('num_classes', type=int, valid=_int(1)), _o('gp'),
    _o('img_size', type=int, valid=_int(1)), _o('in_chans', type=int, valid=_int(1)),
    _o('input_size', type=int, nargs=3,
       valid=Range(lambda v: len(v) == 3 and INTS.ok(v), 'three integers >= 1 (channels, height, width)')),
    _o('crop_pct', type=float, valid=POSITIVE),
    _o('mean', type=float, nargs='+', valid=_each(Range(_finite, ''), 'a list of finite numbers')),
    _o('std', type=float, nargs='+', valid=_each(POSITIVE, 'a list of finite numbers > 0')),
    _o('interpolation', ''), _o('batch_size', 128, type=int, valid=_int(1)),
    _o('validation_batch_size', type=int, valid=_int(1)), _f('channels_last'),
    _o('grad_accum_steps', 1, type=int, valid=_int(1)), _f('grad_checkpointing'),
    _o('model_kwargs', {}, nargs='*', type=str), _o('torchcompile', nargs='?', const='inductor'),
    _o('torchcompile_mode'),
    # device and precision
    _o('device', scope='machine', help="'cuda' (timm's default) when available, else 'cpu'"),
    _f('amp'), _o('amp_dtype', 'float16', choices=('float16', 'bfloat16')), _f('no_ddp_bb'),
    _o('device_modules', nargs='+', scope='machine'),
    # optimizer
    _o('opt', 'sgd'), _o('opt_eps', type=float, valid=POSITIVE), _o('opt_betas', type=float, nargs='+'),
    _o('momentum', 0.9, type=float, valid=NONNEG), _o('weight_decay', 2e-5, type=float, valid=NONNEG),
    _o('clip_grad', type=float, valid=POSITIVE), _o('clip_mode', 'norm'), _o('layer_decay', type=float),
    _o('opt_kwargs', {}, nargs='*', type=str),
    # learning-rate schedule
    _o('sched', 'cosine'), _f('sched_on_updates'), _o('lr', type=float, valid=NONNEG),
    _o('lr_base', 0.1, type=float, valid=POSITIVE), _o('lr_base_size', 256, type=int, valid=_int(1)),
    _o('lr_base_scale', ''), _o('lr_noise', type=float, nargs='+'),
    _o('lr_noise_pct', 0.67, type=float, valid=NONNEG), _o('lr_noise_std', 1.0, type=float, valid=NONNEG),
    _o('lr_cycle_mul', 1.0, type=float, valid=POSITIVE), _o('lr_cycle_decay', 0.5, type=float),
    _o('lr_cycle_limit', 1, type=int), _o('lr_k_decay', 1.0, type=float, valid=POSITIVE),
    _o('warmup_lr', 1e-5, type=float, valid=NONNEG), _o('min_lr', 0, type=float, valid=NONNEG),
    _o('epochs', 300, type=int, valid=_int(1)),
    _o('stop_epoch', type=int, valid=_int(1),
       help='stop after this many epochs of the full schedule (resume later to continue)'),
    _o('save_epochs', type=int, nargs='+', valid=INTS,
       help='keep milestone-N.pth.tar after N completed epochs (evaluated; never deleted)'),
    _o('start_epoch', type=int), _o('decay_milestones', [90, 180, 270], type=int, nargs='+'),
    _o('decay_epochs', 90, type=float), _o('warmup_epochs', 5, type=int, valid=_int(0)), _f('warmup_prefix'),
    _o('cooldown_epochs', 0, type=int, valid=_int(0)), _o('patience_epochs', 10, type=int),
    _o('decay_rate', 0.1, type=float, valid=POSITIVE),
    # augmentation and regularisation
    _f('no_aug', loader='no_aug'), _o('train_crop_mode', loader='train_crop_mode'),
    _o('scale', [0.08, 1.0], type=float, nargs='+', loader='scale'),
    _o('ratio', [3. / 4., 4. / 3.], type=float, nargs='+', loader='ratio'),
    _o('hflip', 0.5, type=float, valid=PROBABILITY, loader='hflip'),
    _o('vflip', 0., type=float, valid=PROBABILITY, loader='vflip'),
    _o('color_jitter', 0.4, type=float, valid=NONNEG, loader='color_jitter'),
    _o('color_jitter_prob', type=float, valid=PROBABILITY, loader='color_jitter_prob'),
    _o('grayscale_prob', type=float, valid=PROBABILITY, loader='grayscale_prob'),
    _o('gaussian_blur_prob', type=float, valid=PROBABILITY, loader='gaussian_blur_prob'),
    _o('aa', loader='auto_augment'), _o('aug_repeats', 0, type=float, valid=NONNEG),
    _f('bce_loss'), _f('bce_sum'), _o('bce_target_thresh', type=float), _o('bce_pos_weight', type=float),
    _o('reprob', 0., type=float, valid=PROBABILITY, loader='re_prob'), _o('remode', 'pixel', loader='re_mode'),
    _o('recount', 1, type=int, loader='re_count'), _f('resplit', loader='re_split'),
    _o('mixup', 0.0, type=float, valid=NONNEG), _o('cutmix', 0.0, type=float, valid=NONNEG),
    _o('cutmix_minmax', type=float, nargs='+'), _o('mixup_prob', 1.0, type=float, valid=PROBABILITY),
    _o('mixup_switch_prob', 0.5, type=float, valid=PROBABILITY), _o('mixup_mode', 'batch'),
    _o('mixup_off_epoch', 0, type=int), _o('smoothing', 0.1, type=float, valid=FRACTION),
    _o('train_interpolation', 'random'), _o('drop', 0.0, type=float, valid=FRACTION),
    _o('drop_path', type=float, valid=FRACTION), _o('drop_block', type=float, valid=FRACTION),
    _o('train_img_sizes', type=int, nargs='+', valid=INTS,
       help='training resolution(s), different from the evaluation size'),
    _o('train_batch_sizes', type=int, nargs='+', valid=INTS),
    # batch norm
    _o('bn_momentum', type=float), _o('bn_eps', type=float), _f('sync_bn'),
    _o('dist_bn', 'reduce', choices=('broadcast', 'reduce', '')),
    # model EMA
    _f('model_ema'), _f('model_ema_force_cpu'),
    _o('model_ema_decay', 0.9998, type=float, valid=_num('a number in (0, 1]', high=1.0, low_open=True)),
    _f('model_ema_warmup'),
    # misc
    _o('seed', 42, type=int), _o('worker_seeding', 'all'), _o('log_interval', 50, type=int, valid=_int(1)),
    _o('val_interval', 1, type=int, valid=_int(1)), _o('recovery_interval', 0, type=int),
    _o('checkpoint_hist', 10, type=int, valid=_int(1)), _o('workers', 4, type=int, valid=_int(0)),
    _f('pin_mem'), _f('no_prefetcher'), _o('output', '', scope='run'), _o('experiment', '', scope='run'),
    _f('overwrite', scope='run', help='replace the run already in OUTPUT/EXPERIMENT (its run files are deleted first)'),
    _o('max_nonfinite_steps', 5, type=int, valid=_int(0),
       help='stop after this many consecutive steps with a NaN/inf loss, of the full network or of the '
            'sub-networks (0 = never)'),
    _o('eval_metric', 'top1', choices=('top1', 'top5', 'loss')),
    _f('log_wandb', scope='machine'), _o('wandb_project', scope='machine'),
    _o('wandb_tags', [], nargs='+', scope='machine'),
    # ours
    _f('log_tensorboard', scope='machine',
       help='also log each epoch to TensorBoard (event files in the run folder; pip install "timm-st[tensorboard]")'),
    _o('eval_subnets', 20, type=int, valid=_int(0),
       help='sub-networks of the sampling space evaluated at the end (results.json); 0 = off'),
)
_BY_NAME = {o.name: o for o in OPTIONS}
# keys of a run's arguments that describe this machine or this run's files, not the training recipe
LOCAL_KEYS = tuple(o.name for o in OPTIONS if o.scope != 'recipe') + ('config',)
RUN_SCOPED = tuple(o.name for o in OPTIONS if o.scope == 'run')


def option_names():
    """The recipe keys `timm-st train` honours besides `stimulative` (timm train.py names)."""
    return [o.name for o in OPTIONS]


def takes_value(name: str) -> bool:
    """Whether the option is followed by a value on the command line (not a flag)."""
    return _BY_NAME[name].spec.get('action') != 'store_true'


def _stimulative_help() -> str:
    from ..method.config import DESCRIPTIONS, StimulativeConfig
    lines = ["Keys of a recipe's stimulative: section, also settable with --stimulative KEY=VALUE ... "
             '(values are YAML; default in brackets):']
    for f in fields(StimulativeConfig):
        lines += textwrap.wrap(f'{f.name} [{f.default}]: {DESCRIPTIONS[f.name]}', 100,
                               initial_indent='  ', subsequent_indent='      ')
    return '\n'.join(lines)


def build_parser(prog: str = TIMM_ST_TRAIN) -> argparse.ArgumentParser:
    """The command line of `timm-st train`: `-c RECIPE`, every option of the table, `--stimulative KEY=VALUE`."""
    parser = argparse.ArgumentParser(
        prog=prog, description='Train a timm model with a timm-st recipe (common or stimulative training).',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='recipe YAML')
    for o in OPTIONS:
        parser.add_argument(o.flag, dest=o.name, **o.spec)
    group = parser.add_argument_group('stimulative training', _stimulative_help())
    group.add_argument('--stimulative', nargs='+', default=None, metavar='KEY=VALUE',
                       help="set single keys of the recipe's stimulative: section (without one: stimulative "
                            'training with the defaults below), e.g. --stimulative num_subnets=2 loss=kl_direction')
    return parser


def check_ranges(args: Any) -> None:
    """Refuse a value outside its option's range (options the runner's `args` lacks, or unset, are skipped)."""
    for o in OPTIONS:
        value = getattr(args, o.name, None)
        if o.valid is None or value is None:
            continue
        try:
            good = o.valid.ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise RunError(f'{o.name} must be {o.valid.allowed}, got {value!r} (set it in the recipe or with {o.flag})')


def augmentation(run_args: Mapping[str, Any], data_config: Mapping[str, Any]) -> Dict[str, Any]:
    """create_loader's training-augmentation arguments of a run (its options, unset ones left to timm), and the
    training interpolation as train.py resolves it. Mixup and cutmix are batch-level: not among them."""
    kwargs = {o.loader: run_args[o.name] for o in OPTIONS if o.loader and run_args.get(o.name) is not None}
    interpolation = run_args.get('train_interpolation')
    kwargs['interpolation'] = (data_config['interpolation'] if run_args.get('no_aug') or not interpolation
                               else interpolation)
    return kwargs

