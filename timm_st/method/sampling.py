"""Sampling sub-networks: the spaces they are drawn from, and samplers that draw a `SubnetPlan`
per sub-network pass from a dedicated generator.

A space resolves, for a model's stages, to a tuple `max_drop` (one entry per stage): an ordered
sub-network drops a number of tail blocks of stage `s` drawn uniformly from `0..max_drop[s]`.
Named spaces live in a registry so users can add their own.

The generator is seeded from the config (the same on every rank, independent of timm's
per-rank seeding) and its state is checkpointed, so every rank draws the same plans and a
resumed run continues the sequence an uninterrupted run would have drawn.
"""
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .adapters import Stage
from .plan import SubnetPlan

__all__ = [
    'SubnetSampler', 'OrderedSubnetSampler', 'RandomSubnetSampler',
    'register_sample_space', 'resolve_sample_space', 'list_sample_spaces',
]

SpaceSpec = Union[str, Mapping[str, Sequence[int]]]

# name -> (stage depths it is written for, or None for any; depths -> max_drop)
_SPACES: Dict[str, Tuple[Optional[Tuple[int, ...]], Callable[[Tuple[int, ...]], Tuple[int, ...]]]] = {}


def register_sample_space(name: str, max_drop: Union[Sequence[int], Callable[[Tuple[int, ...]], Sequence[int]]],
                          depths: Optional[Sequence[int]] = None) -> None:
    """Register a named space: a fixed `max_drop` per stage for networks of stage `depths`,
    or a function `depths -> max_drop` for any layout."""
    if callable(max_drop):
        fn = lambda d, f=max_drop: tuple(f(d))
    else:
        fixed = tuple(int(m) for m in max_drop)
        if depths is None or len(depths) != len(fixed):
            raise ValueError(f'sample space {name!r}: a fixed max_drop needs the stage depths it was written for')
        fn = lambda d, f=fixed: f
    _SPACES[name] = (tuple(depths) if depths is not None else None, fn)


def list_sample_spaces() -> Tuple[str, ...]:
    return tuple(_SPACES)


def resolve_sample_space(space: SpaceSpec, stages: Sequence[Stage]) -> Tuple[int, ...]:
    """`max_drop` per stage for `space` on these stages; a ValueError names what does not fit."""
    depths = tuple(s.depth for s in stages)
    limits = tuple(s.max_tail_drop for s in stages)
    if isinstance(space, str):
        if space not in _SPACES:
            raise ValueError(
                f'sample_space: unknown space {space!r}; named spaces are {list(_SPACES)}, '
                f'or give a mapping {{max_drop: [...]}} / {{min_keep: [...]}} with one entry per stage')
        required, fn = _SPACES[space]
        if required is not None and required != depths:
            raise ValueError(
                f'sample_space: space {space!r} is written for stage depths {list(required)} but this model has '
                f'{list(depths)}; use "default" or a mapping {{max_drop: [...]}} / {{min_keep: [...]}} '
                f'with {len(depths)} entries')
        max_drop = tuple(min(m, lim) for m, lim in zip(fn(depths), limits)) if required is None else fn(depths)
    else:
        if len(space) != 1 or next(iter(space)) not in ('max_drop', 'min_keep'):
            raise ValueError(
                f'sample_space: {dict(space)!r} must be a mapping with exactly one key, max_drop or min_keep, '
                f'whose value lists one integer per stage')
        (key, values), = space.items()
        values = list(values)
        if len(values) != len(depths):
            raise ValueError(
                f'sample_space.{key}: {values} has {len(values)} entries but the model has {len(depths)} stages '
                f'(depths {list(depths)})')
        if key == 'min_keep':
            for s, (k, d) in enumerate(zip(values, depths)):
                if not 1 <= k <= d:
                    raise ValueError(
                        f'sample_space.min_keep: stage {s} keeps at least {k} of its {d} blocks; '
                        f'allowed is 1..{d} (stage depths {list(depths)})')
            max_drop = tuple(d - k for k, d in zip(values, depths))
        else:
            max_drop = tuple(values)
    for s, (m, lim) in enumerate(zip(max_drop, limits)):
        if not 0 <= m <= lim:
            raise ValueError(
                f'sample_space: stage {s} may drop at most {lim} trailing blocks (depth {depths[s]}, first block '
                f'always kept, only blocks with a skip connection droppable), but the space asks for {m}; '
                f'resolved max_drop {list(max_drop)}, allowed per stage {list(limits)}')
    return max_drop


register_sample_space('default', lambda depths: [d - 1 for d in depths])
for _name, _max_drop in {  # the paper's inter-stage spaces, for ResNet-50's stage depths
    'space1': (1, 2, 4, 1), 'space2': (1, 2, 5, 2), 'space3': (0, 1, 3, 0), 'space4': (0, 1, 4, 1),
    'space5': (0, 0, 2, 0), 'space6': (0, 1, 3, 1), 'space7': (0, 2, 4, 0),
}.items():
    register_sample_space(_name, _max_drop, depths=(3, 4, 6, 3))


class SubnetSampler:
    """Base: owns the generator and draws the sub-network input size.

    `input_scale=(lo, hi)` draws the input side uniformly from the integers in
    `[int(lo * H), int(hi * H)]` for a batch of height H; None keeps the batch size.
    `input_size_multiple=m > 1` then rounds the drawn side to the nearest multiple of m (halves
    up), at least m, so at most `(hi - lo) * H / m + 2` distinct sides occur; the draws themselves
    are unchanged, so the generator's sequence is the same as with m = 1.
    Subclasses implement `_draw_blocks()`.
    """

    def __init__(self, input_scale: Optional[Tuple[float, float]] = None, seed: int = 0, input_size_multiple: int = 1):
        if not isinstance(input_size_multiple, int) or isinstance(input_size_multiple, bool) or input_size_multiple < 1:
            raise ValueError(f'input_size_multiple must be an integer >= 1, got {input_size_multiple!r}')
        self.input_scale = tuple(input_scale) if input_scale is not None else None
        self.input_size_multiple = input_size_multiple
        self.generator = torch.Generator(device='cpu').manual_seed(seed)

    def _randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator))

    def _draw_blocks(self) -> Tuple[Tuple[int, ...], ...]:
        raise NotImplementedError

    def sample(self, input_height: Optional[int] = None) -> SubnetPlan:
        blocks = self._draw_blocks()
        size = None
        if self.input_scale is not None:
            if input_height is None:
                raise ValueError('This sampler resizes inputs (input_scale) and needs the batch height.')
            lo, hi = self.input_scale
            size = self._randint(max(1, int(lo * input_height)), max(1, int(hi * input_height)))
            m = self.input_size_multiple
            size = max(m, (size + m // 2) // m * m)
        return SubnetPlan(blocks, size)

    def state_dict(self) -> Dict[str, Any]:
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state['generator'])


class OrderedSubnetSampler(SubnetSampler):
    """Keep a prefix of every stage; the dropped tail length of stage s is uniform in 0..max_drop[s]."""

    def __init__(self, depths: Sequence[int], max_drop: Sequence[int],
                 input_scale: Optional[Tuple[float, float]] = None, seed: int = 0, input_size_multiple: int = 1):
        super().__init__(input_scale, seed, input_size_multiple)
        if len(depths) != len(max_drop) or any(not 0 <= m < d for d, m in zip(depths, max_drop)):
            raise ValueError(f'max_drop {list(max_drop)} does not fit stage depths {list(depths)}')
        self.depths = tuple(depths)
        self.max_drop = tuple(max_drop)

    def _draw_blocks(self) -> Tuple[Tuple[int, ...], ...]:
        return tuple(tuple(range(d - self._randint(0, m))) for d, m in zip(self.depths, self.max_drop))


class RandomSubnetSampler(SubnetSampler):
    """Keep each droppable block independently, with probability falling linearly over depth.

    Block l of the L blocks of the network (counted across stages) is kept with probability
    `1 - l / (L - 1) * (1 - min_keep_prob)`; blocks without a skip, and the first block of each
    stage, are always kept.
    """

    def __init__(self, stages: Sequence[Stage], min_keep_prob: float = 0.8,
                 input_scale: Optional[Tuple[float, float]] = None, seed: int = 0, input_size_multiple: int = 1):
        super().__init__(input_scale, seed, input_size_multiple)
        flags = [d for stage in stages for d in stage.droppable]  # block l of the network (across stages)
        keep = iter([1.0 - (l / max(len(flags) - 1, 1)) * (1.0 - min_keep_prob) if d else 1.0
                     for l, d in enumerate(flags)])
        self.keep_probs = [torch.tensor([next(keep) for _ in stage.droppable], dtype=torch.float64) for stage in stages]

    def _draw_blocks(self) -> Tuple[Tuple[int, ...], ...]:
        draws = [torch.rand(len(p), generator=self.generator, dtype=torch.float64) < p for p in self.keep_probs]
        return tuple(tuple(i for i, k in enumerate(d.tolist()) if k) for d in draws)
