"""`StimulativeConfig`: the validated `stimulative:` section of a recipe."""
import math
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Tuple, Union

from .losses import get_subnet_loss, list_subnet_losses

__all__ = ['StimulativeConfig', 'DESCRIPTIONS', 'describe_method']

_CHOICES = {
    'norm': ('layernorm', 'l2'),
    'coef_schedule': ('constant', 'cosine_up', 'cosine_down'),
    'sampler': ('ordered', 'random'),
    'bn': ('freeze', 'update'),
}


class _NotNull(str):
    """An `_ONLY_WITH` value meaning any setting of the other key but null (the string is an example)."""


# keys that only mean something for one setting of another key: key -> (other key, value)
_ONLY_WITH = {
    'norm': ('loss', 'kl_direction'),
    'amplitude': ('loss', 'kl_direction'),
    'min_keep_prob': ('sampler', 'random'),
    'sample_space': ('sampler', 'ordered'),
    'input_size_multiple': ('input_scale', _NotNull('[lo, hi]')),
}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f'stimulative.{key}: got {value!r}; allowed: {allowed}')


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class StimulativeConfig:
    """Settings of stimulative training; `from_dict` validates a recipe section (`DESCRIPTIONS` says what each
    key means, the cheaper schedules `subnet_interval` and `subnet_batch_fraction` included).

    The loss of a training step is `main + coef * sum_i loss_i`: `main` is the criterion on the full network's
    logits, and each of the `num_subnets` sampled sub-networks (residual blocks dropped by the sampler, the
    batch optionally resized by `input_scale`) is trained by `loss_i` to imitate the full network's detached
    logits. `coef` follows `coef_schedule` over the epochs and is 0 before `start_epoch`.
    """

    num_subnets: int = 1
    loss: str = 'kl'
    norm: str = 'layernorm'
    amplitude: float = 1.0
    temperature: float = 1.0
    coef: float = 1.0
    coef_schedule: str = 'constant'
    start_epoch: int = 0
    sampler: str = 'ordered'
    min_keep_prob: float = 0.8
    sample_space: Union[str, Mapping[str, Tuple[int, ...]]] = 'default'
    input_scale: Optional[Tuple[float, float]] = None
    input_size_multiple: int = 1
    bn: str = 'freeze'
    recalibrate_bn: int = 0
    seed: int = 0
    subnet_interval: int = 1
    subnet_batch_fraction: float = 1.0

    @classmethod
    def from_dict(cls, section: Optional[Mapping[str, Any]]) -> 'StimulativeConfig':
        """Validate a `stimulative:` mapping; unknown keys, wrong types and bad values raise ValueError."""
        section = dict(section or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f'stimulative: unknown key(s) {unknown}; allowed keys: {known}')
        v = {k: section.get(k, getattr(cls, k)) for k in known}

        for key in ('num_subnets', 'start_epoch', 'recalibrate_bn', 'seed'):
            if not _is_int(v[key]) or (key != 'seed' and v[key] < 0):
                _fail(key, v[key], 'an integer >= 0' if key != 'seed' else 'an integer')
        if not _is_int(v['input_size_multiple']) or v['input_size_multiple'] < 1:
            _fail('input_size_multiple', v['input_size_multiple'], 'an integer >= 1 (1 = any size)')
        if not _is_int(v['subnet_interval']) or v['subnet_interval'] < 1:
            _fail('subnet_interval', v['subnet_interval'], 'an integer >= 1 (1 = sub-networks on every step)')
        if not _is_number(v['subnet_batch_fraction']) or not 0 < v['subnet_batch_fraction'] <= 1:
            _fail('subnet_batch_fraction', v['subnet_batch_fraction'], 'a number in (0, 1] (1 = the whole batch)')
        if v['loss'] not in list_subnet_losses():
            _fail('loss', v['loss'], f'one of {list(list_subnet_losses())}')
        for key, choices in _CHOICES.items():
            if v[key] not in choices:
                _fail(key, v[key], f'one of {list(choices)}')
        for key in ('amplitude', 'temperature'):
            if not _is_number(v[key]) or v[key] <= 0:
                _fail(key, v[key], 'a number > 0')
        if not _is_number(v['coef']) or v['coef'] < 0:
            _fail('coef', v['coef'], 'a number >= 0')
        if not _is_number(v['min_keep_prob']) or not 0 < v['min_keep_prob'] <= 1:
            _fail('min_keep_prob', v['min_keep_prob'], 'a number in (0, 1]')
        v['sample_space'] = _check_space(v['sample_space'])
        v['input_scale'] = _check_scale(v['input_scale'])
        for key, (other, needed) in _ONLY_WITH.items():
            if key in section and (v[other] is None if isinstance(needed, _NotNull) else v[other] != needed):
                raise ValueError(
                    f'stimulative.{key}: only used with {other}: {needed}, but {other} is {v[other]!r}; '
                    f'remove {key} or set {other}: {needed}')
        for key in ('amplitude', 'temperature', 'coef', 'min_keep_prob', 'subnet_batch_fraction'):
            v[key] = float(v[key])
        return cls(**v)

    @property
    def subnet_loss(self):
        return get_subnet_loss(self.loss)

    @property
    def normalizes_main_logits(self) -> bool:
        """Whether the main network's criterion sees layer-normalised logits (the KL- losses)."""
        return self.subnet_loss.normalized_logits

    @property
    def is_common_training(self) -> bool:
        """No sub-network loss (`num_subnets: 0` or `coef: 0`) and the main criterion on the plain logits:
        exactly common training."""
        return (self.num_subnets == 0 or self.coef == 0) and not self.normalizes_main_logits

    def check_targets(self, soft_targets: bool) -> None:
        """Fail early when the loss needs class-index targets but mixup/cutmix will make soft ones."""
        if soft_targets and self.subnet_loss.hard_labels:
            raise ValueError(f'stimulative.loss: {self.loss!r} needs class-index targets, but mixup/cutmix make '
                             f'soft targets; disable mixup/cutmix or choose another loss')

    def subnet_batch_size(self, batch_size: int) -> int:
        """Images of a batch of `batch_size` the sub-networks see: `ceil(subnet_batch_fraction * batch_size)`, the
        product rounded to 9 decimals first (0.07 * 100 is 7.000000000000001 in floating point: 7 images, not 8)."""
        return max(1, math.ceil(round(self.subnet_batch_fraction * batch_size, 9)))  # at least 1 image

    def coef_at(self, epoch: int, num_epochs: Optional[int]) -> float:
        """Weight of the sub-network losses at `epoch` (0 before `start_epoch`)."""
        if self.num_subnets == 0 or epoch < self.start_epoch:
            return 0.0
        if self.coef_schedule == 'constant':
            return self.coef
        up = self.coef * (1.0 - math.cos(math.pi * epoch / num_epochs)) / 2.0
        return up if self.coef_schedule == 'cosine_up' else self.coef - up


# what each key means, for `timm-st train --help` and the README (one entry per field)
DESCRIPTIONS = {
    'num_subnets': 'sub-networks sampled per training step (0 = common training on the full network only)',
    'loss': 'sub-network loss against the detached full network: kl, kl_direction (KL-, on layer-normalised '
            'logits; the main criterion then also sees normalised logits), soft_ce, mse, dkd, or a registered one',
    'norm': 'logit normalisation of kl_direction: layernorm or l2',
    'amplitude': 'scale A of the normalised logits (kl_direction)',
    'temperature': 'distillation temperature T of the sub-network loss',
    'coef': 'weight of each sub-network loss (step loss: main + coef * sum of the sub-network losses)',
    'coef_schedule': 'coef over the epochs: constant, cosine_up (0 -> coef) or cosine_down (coef -> 0)',
    'start_epoch': 'first epoch with sub-network losses',
    'sampler': 'ordered (keep a prefix of every stage) or random (drop each block independently)',
    'min_keep_prob': 'random sampler: lowest keep probability (linear from the first to the last block)',
    'sample_space': "ordered sampler: a space name ('default', 'space1'..'space7') or "
                    '{max_drop: [per stage]} / {min_keep: [per stage]}',
    'input_scale': 'null, or [lo, hi]: each sub-network sees the batch resized to a side drawn in '
                   '[int(lo * side), int(hi * side)] (ST++)',
    'input_size_multiple': 'with input_scale: round each drawn side to the nearest multiple of this (halves up, '
                           'at least one multiple), so fewer distinct shapes occur (1 = any integer, as the authors)',
    'bn': 'freeze: sub-network passes leave BatchNorm running statistics untouched; update: they update them',
    'recalibrate_bn': 'training images used to re-estimate BatchNorm statistics before each validation (0 = off)',
    'seed': 'seed of the sub-network sampler (the same on every rank)',
    'subnet_interval': 'sub-networks only on training steps 0, k, 2k, ... of the run (a step is one micro-batch: one '
                       'optimizer step without gradient accumulation; counted alike on every rank, saved in '
                       'checkpoints); the other steps train the full network alone. coef is kept, not multiplied by '
                       'k: each sub-network loss weighs coef as on an ST step, so gradient clipping and the logged '
                       'losses see ST\'s scale; coef: k * c gives the expected stimulus per step of coef: c on '
                       'every step (1 = every step)',
    'subnet_batch_fraction': 'sub-networks see only the first ceil(f * B) images of each batch of B (the loaders '
                             'shuffle, so a uniform random subset), their losses averaged over those images and '
                             'compared with the full network\'s prediction and targets of the same images: an unbiased '
                             'estimate of the whole-batch loss, so coef needs no rescaling (1 = the whole batch)',
}


def _check_space(space: Any):
    if isinstance(space, str):
        return space
    if isinstance(space, Mapping) and len(space) == 1:
        (key, values), = space.items()
        if key in ('max_drop', 'min_keep') and isinstance(values, (list, tuple)) and values and all(
                _is_int(x) and x >= 0 for x in values):
            return {key: tuple(values)}
    _fail('sample_space', space, 'a space name, or a mapping {max_drop: [ints >= 0 per stage]} or '
                                 '{min_keep: [ints >= 1 per stage]}')


def _check_scale(scale: Any):
    if scale is None:
        return None
    if (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(_is_number(s) for s in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        return (float(scale[0]), float(scale[1]))
    _fail('input_scale', scale, 'null, or [lo, hi] with 0 < lo <= hi <= 1')


def describe_method(stimulative: Optional[Mapping[str, Any]]) -> Tuple[str, str, List[str]]:
    """(short tag, description, ST++ strategies used) of a `stimulative:` section, named from the settings,
    never from file names: tags ct, ctnorm, st, stpp (results.json, model cards and published names).

    CT: no `stimulative:` section, or no sub-network loss (`num_subnets: 0` or `coef: 0`) on plain logits.
    `num_subnets: 0` with the KL- loss is not CT: the main network trains on layer-normalised logits ('ctnorm').
    ST++: ST plus any of the ST++ strategies: the KL- loss, several sub-networks per step, random smaller
    sub-network inputs, or one of the paper's inter-stage sampling spaces (space1..space7). A space the
    user writes per stage (max_drop / min_keep) only narrows the sampling and does not by itself make ST++.
    A cheaper schedule (`subnet_interval`, `subnet_batch_fraction`) leaves the tag as it is and is named in the
    description ('stimulative training (ST) with sub-networks on every 3rd step').
    """
    if stimulative is None:
        return 'ct', 'common training (CT, no stimulative loss)', []
    try:
        config = StimulativeConfig.from_dict(stimulative)
    except ValueError:  # written by another timm-st version: describe it as is
        return 'st', 'stimulative training', []
    normalized = config.normalizes_main_logits
    if config.num_subnets == 0 or config.coef == 0:
        why = '`num_subnets: 0`' if config.num_subnets == 0 else '`coef: 0`'
        if normalized:
            return ('ctnorm', f'common training on layer-normalised logits (no sub-networks, {why}; '
                              f'`loss: {config.loss}` normalises the main logits)', [])
        return 'ct', f'common training (CT, {why})', []
    strategies = []
    if normalized:
        strategies.append(f'KL- loss `{config.loss}` (aligns only the direction of the logits)')
    if config.num_subnets > 1:
        strategies.append(f'{config.num_subnets} sub-networks per step')
    if config.input_scale is not None:
        strategies.append(f'random smaller inputs for sub-networks (side scale {config.input_scale[0]:g}-'
                          f'{config.input_scale[1]:g})')
    if config.sampler == 'ordered' and isinstance(config.sample_space, str) and config.sample_space != 'default':
        strategies.append(f'inter-stage sampling rule (sample space {config.sample_space})')
    tag, description = ('stpp', 'stimulative training++ (ST++)') if strategies else ('st', 'stimulative training (ST)')
    schedule = []  # the cheaper sub-network schedule, if any
    if config.subnet_interval > 1:
        schedule.append(f'on every {_ordinal(config.subnet_interval)} step')
    if config.subnet_batch_fraction < 1:
        schedule.append(f'on {100 * config.subnet_batch_fraction:g}% of each batch')
    return tag, description + (f' with sub-networks {" and ".join(schedule)}' if schedule else ''), strategies


def _ordinal(n: int) -> str:
    return f'{n}{"th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")}'
