"""`SubnetPlan`: which blocks of each stage a sub-network keeps, and the input size it sees.

Sub-network inputs are always resized from the original batch, once, with no second normalisation.
"""
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['SubnetPlan', 'resize_input']


@dataclass(frozen=True)
class SubnetPlan:
    """A sub-network: the kept block indices of every stage and the input size.

    `blocks[s]` lists, in increasing order, the indices of the blocks of stage `s` that run;
    the others are skipped. Ordered ("keep the first k") plans are prefixes, random plans are
    arbitrary masks; both are this one type. `input_size` is the side of the square the batch
    is resized to before the pass, or None to use the batch as it is. Plans are hashable, so
    the distinct sub-networks of a run can be counted.
    """

    blocks: Tuple[Tuple[int, ...], ...]
    input_size: Optional[int] = None

    def __post_init__(self):
        blocks = tuple(tuple(int(i) for i in stage) for stage in self.blocks)
        object.__setattr__(self, 'blocks', blocks)
        for s, kept in enumerate(blocks):
            if not kept or kept[0] != 0:
                raise ValueError(f'SubnetPlan stage {s} must keep its first block (index 0), got {kept}')
            if any(b <= a for a, b in zip(kept, kept[1:])):
                raise ValueError(f'SubnetPlan stage {s} block indices must be strictly increasing, got {kept}')
        size = self.input_size
        if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1):
            raise ValueError(f'SubnetPlan input_size must be a positive int or None, got {size!r}')
        if size is not None:
            object.__setattr__(self, 'input_size', int(size))

    @classmethod
    def prefix(cls, depths: Sequence[int], input_size: Optional[int] = None) -> 'SubnetPlan':
        """Keep the first `depths[s]` blocks of every stage `s`."""
        return cls(tuple(tuple(range(d)) for d in depths), input_size)

    @classmethod
    def from_masks(cls, masks: Sequence[Sequence[bool]], input_size: Optional[int] = None) -> 'SubnetPlan':
        """Keep the blocks whose mask entry is true (one mask per stage)."""
        return cls(tuple(tuple(i for i, keep in enumerate(m) if keep) for m in masks), input_size)

    @property
    def depths(self) -> Tuple[int, ...]:
        """Number of kept blocks per stage."""
        return tuple(len(kept) for kept in self.blocks)


def resize_input(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Resize a normalised NCHW batch to `size x size` (bilinear, antialiased), keeping channels-last."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    out = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
