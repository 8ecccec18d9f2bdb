"""Sub-network samplers: draw a `SubnetPlan` per sub-network pass from a dedicated generator.

The generator is seeded from the config (the same on every rank, independent of timm's
per-rank seeding) and its state is checkpointed, so every rank draws the same plans and a
resumed run continues the sequence an uninterrupted run would have drawn.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .adapters import Stage
from .plan import SubnetPlan

__all__ = ['SubnetSampler', 'OrderedSubnetSampler', 'RandomSubnetSampler']


class SubnetSampler:
    """Base: owns the generator and draws the sub-network input size.

    `input_scale=(lo, hi)` draws the input side uniformly from the integers in
    `[int(lo * H), int(hi * H)]` for a batch of height H; None keeps the batch size.
    Subclasses implement `_draw_blocks()`.
    """

    def __init__(self, input_scale: Optional[Tuple[float, float]] = None, seed: int = 0):
        self.input_scale = tuple(input_scale) if input_scale is not None else None
        self.generator = torch.Generator(device='cpu')
        self.generator.manual_seed(seed)

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
        return SubnetPlan(blocks, size)

    def state_dict(self) -> Dict[str, Any]:
        return {'generator': self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state['generator'])


class OrderedSubnetSampler(SubnetSampler):
    """Keep a prefix of every stage; the dropped tail length of stage s is uniform in 0..max_drop[s]."""

    def __init__(
            self,
            depths: Sequence[int],
            max_drop: Sequence[int],
            input_scale: Optional[Tuple[float, float]] = None,
            seed: int = 0,
    ):
        super().__init__(input_scale, seed)
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

    def __init__(
            self,
            stages: Sequence[Stage],
            min_keep_prob: float = 0.8,
            input_scale: Optional[Tuple[float, float]] = None,
            seed: int = 0,
    ):
        super().__init__(input_scale, seed)
        total = sum(s.depth for s in stages)
        probs, l = [], 0
        for stage in stages:
            stage_probs = []
            for droppable in stage.droppable:
                p = 1.0 - (l / max(total - 1, 1)) * (1.0 - min_keep_prob)
                stage_probs.append(p if droppable else 1.0)
                l += 1
            probs.append(torch.tensor(stage_probs, dtype=torch.float64))
        self.keep_probs = probs

    def _draw_blocks(self) -> Tuple[Tuple[int, ...], ...]:
        draws = [torch.rand(len(p), generator=self.generator, dtype=torch.float64) < p for p in self.keep_probs]
        return tuple(tuple(i for i, k in enumerate(d.tolist()) if k) for d in draws)
