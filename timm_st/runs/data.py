"""Data: datasets and their class names, the data config, the image mode, and the loaders of a run.

What `timm-st train`, `analyze` and `publish` must agree on: the data config (`data_config`, timm's
`resolve_data_config`), the image mode by timm train.py's rule (`image_mode`), `dataset: digits` as an
image folder (`dataset_location`), training augmentation from the options table. `calibration_loader`
is the one calibration rule (results.json, `timm-st analyze`): a fixed seeded subset of training images
under the run's training augmentation, without mixup or cutmix (batch-level mixing is no distribution).
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .digits import materialize_digits
from .errors import RunError
from .options import augmentation
from ..prefetch import guard_prefetcher

__all__ = ['REMOTE_DATASETS', 'DIGITS', 'is_remote', 'dataset_location', 'data_config', 'image_mode', 'create_split',
           'class_names', 'FixedSubset', 'fixed_subset', 'eval_loader', 'calibration_loader']

REMOTE_DATASETS = ('torch/', 'hfds/', 'hfids/', 'tfds/', 'wds/')  # timm datasets read from elsewhere than a folder
DIGITS = 'digits'  # the embedded demo dataset (scikit-learn's digits as an image folder)


def is_remote(name: Optional[str]) -> bool:
    """Whether timm reads dataset `name` by itself (torchvision, Hugging Face, TFDS, WebDataset), not from a folder."""
    return bool(name) and name.startswith(REMOTE_DATASETS)


def dataset_location(name: Optional[str], data_dir: Optional[str]) -> Tuple[str, Optional[str]]:
    """(timm dataset name, root) of a run's data: `digits` becomes an image folder, written once, under `data_dir`
    (default: the timm-st cache); other datasets are as given."""
    if name == DIGITS:
        return '', str(materialize_digits(data_dir or None))
    return name or '', data_dir


def data_config(run_args: Mapping[str, Any], model: torch.nn.Module, use_test_size: bool = False,
                verbose: bool = False) -> Dict[str, Any]:
    """The evaluation preprocessing of a run (input size, interpolation, mean, std, crop), as timm's train.py
    resolves it from the run's arguments and the model's pretrained config."""
    from timm.data import resolve_data_config
    args = {k: tuple(v) if k in ('input_size', 'mean', 'std') and isinstance(v, list) else v
            for k, v in run_args.items()}
    return resolve_data_config(args, model=model, use_test_size=use_test_size, verbose=verbose)


def image_mode(input_img_mode: Optional[str], config: Mapping[str, Any]) -> str:
    """The PIL mode images are read in, by timm train.py's rule: `input_img_mode` if set, else RGB when the data
    config has 3 input channels and grayscale ('L') otherwise."""
    return input_img_mode or ('RGB' if config['input_size'][0] == 3 else 'L')


def create_split(name: str, root: Optional[str], split: str, img_mode: str, is_training: bool = False,
                 class_map: str = '', download: bool = False, batch_size: Optional[int] = None,
                 shown: Optional[str] = None):
    """timm's dataset of one split; a dataset that cannot be read or holds no images is a one-line RunError."""
    from timm.data import create_dataset
    shown = shown or f'{name or "image folder"} at {root}'
    try:
        dataset = create_dataset(name, root=root, split=split, is_training=is_training, class_map=class_map,
                                 download=download, batch_size=batch_size, input_img_mode=img_mode)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f'cannot read split {split!r} of {shown} ({first}); an image folder needs {split}/<class>/ '
                       f'subfolders with images: fix --data-dir, --dataset or the split') from None
    if len(dataset) == 0:
        raise RunError(f'split {split!r} of {shown} holds no images; fix --data-dir or the split')
    return dataset


def class_names(dataset) -> Optional[List[str]]:
    """The class names of a timm dataset in label order (an image folder's subfolders, a torchvision dataset's
    classes), None when it has none."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if class_to_idx:
        return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    classes = getattr(dataset, 'classes', None)
    return [str(c) for c in classes] if classes else None


class FixedSubset(torch.utils.data.Subset):
    """A fixed subset of a timm dataset; `transform` is the parent's, so timm's create_loader sets it."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def fixed_subset(size: int, count: int, seed: int) -> List[int]:
    """`count` distinct indices of a dataset of `size`, a fixed random draw in increasing order (all of them when
    count >= size): every class represented (image folders are sorted by class), the same images every time."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=g)[:min(count, size)].tolist())


def eval_loader(dataset, config: Mapping[str, Any], batch_size: int, workers: int, device: torch.device,
                distributed: bool = False, **kwargs):
    """timm's evaluation loader with the data config's preprocessing (center crop)."""
    from timm.data import create_loader
    return guard_prefetcher(create_loader(
        dataset, input_size=config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=config['interpolation'], mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'],
        crop_mode=config.get('crop_mode', 'center'), num_workers=workers, distributed=distributed, device=device,
        persistent_workers=workers > 0, **kwargs))


def calibration_loader(dataset, run_args: Mapping[str, Any], config: Mapping[str, Any], images: int, seed: int,
                       batch_size: int, workers: int, device: torch.device):
    """The loader BatchNorm statistics are re-estimated on: `images` training images (a fixed subset drawn with
    `seed`) under the run's training augmentation (timm's defaults without a run), no mixup or cutmix."""
    from timm.data import create_loader
    subset = FixedSubset(dataset, fixed_subset(len(dataset), images, seed))
    return guard_prefetcher(create_loader(
        subset, input_size=config['input_size'], batch_size=min(batch_size, len(subset)), is_training=True,
        mean=config['mean'], std=config['std'], num_workers=workers, device=device, persistent_workers=workers > 0,
        **augmentation(run_args, config)))
