"""Checkpoints: the one reader of checkpoint files, on timm's `load_state_dict`.

`load_weights` returns a checkpoint's weights as `timm.models.load_state_dict` reads them (safetensors or
torch files, training checkpoints or state dicts, DDP/compile prefixes removed), refusing more than timm:
the file is loaded `weights_only`, absent EMA weights are refused (timm silently falls back to the plain
ones), and so are NaN/inf weights. `read_checkpoint` reads a training checkpoint's other entries (epoch,
metric, args, task state), memory-mapped. Every refusal is a one-line `RunError`.
"""
import argparse
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .errors import RunError

__all__ = ['read_checkpoint', 'load_weights', 'EMA_KEYS']

PathLike = Union[str, Path]
EMA_KEYS = ('state_dict_ema', 'model_ema')  # where timm's load_state_dict finds EMA weights


def _unreadable(path: PathLike, e: BaseException) -> RunError:
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return RunError(f'checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {first}); it is corrupt or not a '
                    f'PyTorch checkpoint')


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """A training checkpoint's dictionary, loaded safely (`weights_only`, memory-mapped where the format allows)."""
    checkpoint, error = None, None
    for mmap in (True, False):  # files of the legacy (non-zip) format cannot be memory-mapped
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
            break
        except Exception as e:  # a truncated, foreign or garbage file
            error = e
    if checkpoint is None:
        raise _unreadable(path, error)
    if not isinstance(checkpoint, dict):
        raise RunError(f'checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dictionary')
    return checkpoint


def load_weights(path: PathLike, ema: bool = False, checkpoint: Optional[Mapping[str, Any]] = None
                 ) -> Dict[str, torch.Tensor]:
    """The plain or EMA weights of a checkpoint file (timm's `load_state_dict`), checked finite.

    `checkpoint`: the file's dictionary when the caller has read it already (to check for EMA weights).
    """
    from timm.models import load_state_dict
    path = str(path)
    if ema:
        entries = {} if path.endswith('.safetensors') else (checkpoint or read_checkpoint(path))
        if not any(isinstance(entries.get(k), dict) and entries.get(k) for k in EMA_KEYS):
            raise RunError(f'checkpoint {path!r} holds no EMA weights (train with --model-ema / `model_ema: true` '
                           f'to keep them); use the plain weights')
    timm_logger = logging.getLogger('timm.models._helpers')
    level = timm_logger.level
    timm_logger.setLevel(logging.WARNING)  # its "Loaded state_dict from checkpoint" line
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            weights = load_state_dict(path, use_ema=ema, weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None
    finally:
        timm_logger.setLevel(level)
    if not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise RunError(f'checkpoint {path!r} holds no model weights ("state_dict"); it is not a training checkpoint '
                       f'of timm or a state dict')
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunError(f'checkpoint {path!r}: weight {name!r} holds NaN or inf (the run diverged?); use an '
                           f'earlier checkpoint')
    return weights
