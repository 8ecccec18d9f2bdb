"""Sub-network input resizing: always from the original batch, once, no second normalisation."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['resize_input']


def resize_input(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Resize a normalised NCHW batch to `size x size` (bilinear, antialiased), keeping channels-last."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    out = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
