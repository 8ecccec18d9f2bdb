"""The embedded demo dataset: scikit-learn's bundled handwritten digits as a timm image folder.

1,797 real 8x8 grayscale images of 10 classes ship inside scikit-learn, so the demo needs no
download. They are written once, with a fixed train/validation split, as PNG files under
`<root>/train/<class>/` and `<root>/validation/<class>/`, which timm's own image-folder
pipeline then reads like any other dataset.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

__all__ = ['materialize_digits', 'default_digits_root']

_MARKER = '.complete'


def default_digits_root() -> Path:
    """`$TIMM_ST_CACHE/digits`, or `~/.cache/timm-st/digits`."""
    cache = os.environ.get('TIMM_ST_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'timm-st')
    return Path(cache) / 'digits'


def materialize_digits(root: Optional[Union[str, Path]] = None, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits image folder under `root` (once) and return `root`."""
    root = Path(root) if root else default_digits_root()
    if (root / _MARKER).exists():
        return root
    try:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError(
            f'The digits demo needs scikit-learn ({e}); install it with: pip install "timm-st[demo]"') from None
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.RandomState(seed).permutation(len(images))
    num_val = int(round(len(images) * val_fraction))
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.digits-', dir=root.parent))
    try:
        for rank, index in enumerate(order):
            split = 'validation' if rank < num_val else 'train'
            folder = tmp / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f'{index:04d}.png')
        (tmp / _MARKER).write_text(f'{len(images)} images, {num_val} validation, seed {seed}\n')
        if root.exists():  # an incomplete earlier attempt
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root
