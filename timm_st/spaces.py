"""Sampling spaces: per stage, how many trailing blocks an ordered sub-network may drop.

A space resolves, for a model's stages, to a tuple `max_drop` (one entry per stage): the
number of dropped tail blocks of stage `s` is drawn uniformly from `0..max_drop[s]`.
Named spaces live in a registry so users can add their own.
"""
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .adapters import Stage

__all__ = ['register_sample_space', 'resolve_sample_space', 'list_sample_spaces']

SpaceSpec = Union[str, Mapping[str, Sequence[int]]]

# name -> (stage depths it is written for, or None for any; depths -> max_drop)
_SPACES: Dict[str, Tuple[Optional[Tuple[int, ...]], Callable[[Tuple[int, ...]], Tuple[int, ...]]]] = {}


def register_sample_space(
        name: str,
        max_drop: Union[Sequence[int], Callable[[Tuple[int, ...]], Sequence[int]]],
        depths: Optional[Sequence[int]] = None,
) -> None:
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
for _name, _max_drop in {
        'space1': (1, 2, 4, 1),
        'space2': (1, 2, 5, 2),
        'space3': (0, 1, 3, 0),
        'space4': (0, 1, 4, 1),
        'space5': (0, 0, 2, 0),
        'space6': (0, 1, 3, 1),
        'space7': (0, 2, 4, 0),
}.items():
    register_sample_space(_name, _max_drop, depths=(3, 4, 6, 3))
