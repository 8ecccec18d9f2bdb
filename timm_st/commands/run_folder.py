"""Reading training checkpoints (as timm's CheckpointSaver writes them) with a clear error."""
import argparse
from typing import Any, Dict, Union
from pathlib import Path

import torch

__all__ = ['read_checkpoint']


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint dictionary safely (`weights_only`); a ValueError says why it cannot be used."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated, foreign or garbage file
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise ValueError(f'checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {first}); '
                         f'it is corrupt or not a PyTorch checkpoint') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dictionary')
    return checkpoint
