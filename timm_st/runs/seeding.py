"""Keyed random draws: every random draw of training is a function of (run seed, rank, epoch, batch), never of
the history of a process, so a run continued from a checkpoint draws exactly what the uninterrupted run drew.

timm's training loader draws from process-global generators: the shuffle order from torch's default generator
at each `iter()`; the augmentations and `FastCollateMixup` in the loader's worker processes, seeded once when
persistent workers start; the prefetcher's random erasing on the device, one batch ahead of the step. The model
(dropout, stochastic depth) and `Mixup` draw in the main process. None of this can be restored at a step
boundary, so here every draw is keyed instead:

* `EpochBatches`, the batch sampler: the epoch order drawn from (seed, epoch) (distributed samplers are a
  function of their epoch already); each batch carries its key; a pass can start at a batch position (a run
  continued mid-epoch skips the index lists of the batches done, not their data);
* `SeededBatches`, the dataset: loads and collates a batch (transforms, mixup, erasing without the prefetcher)
  after seeding torch's CPU generator, NumPy's and Python's from the batch's key, in whichever process loads
  it, so any number of workers (persistent ones included) loads identical batches;
* `SeededErasing`: the prefetcher's random erasing, seeded from the key of the batch it erases;
* `SeededLoader` (`seeded_loader`): seeds the main process's generators (also the run's device) from (seed,
  rank, epoch, step) as each batch is handed to its step.

timm-st train and timm's train.py with the hook use the same keyed loader, so both routes draw alike. A
checkpoint needs no generator state, only its position; the cost is one reseed of three generators per batch
and per step (microseconds, against milliseconds to load a batch), and no worker is respawned.
"""
import random
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler

__all__ = ['key_seed', 'EpochBatches', 'SeededBatches', 'SeededErasing', 'SeededLoader', 'seeded_loader',
           'set_loader_epoch']

_ORDER, _DATA, _ERASING, _STEP = range(4)  # what a key seeds: distinct streams for the same position


def key_seed(*key: int) -> int:
    """A 64-bit seed mixed from integers (NumPy's SeedSequence: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([k % 2 ** 64 for k in key]).generate_state(1, np.uint64)[0])


def _seed(seed: int, device: Optional[torch.device] = None) -> None:
    """Seed torch's CPU generator, NumPy's, Python's and, for an accelerator `device`, its current generator (the
    run's; torch.manual_seed's loop over every device type costs ~100 us)."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    if device is not None and device.type != 'cpu':
        torch.get_device_module(device.type).manual_seed(seed)


class _Wrapper:
    """Length and other attributes (e.g. average_batch_size, filenames, mixup_enabled) of the object in `_wrapped`."""
    _wrapped = ''

    def __len__(self) -> int:
        return len(getattr(self, self._wrapped))

    def __getattr__(self, name: str) -> Any:
        if name == self._wrapped:  # not set yet (while unpickled in a loader worker)
            raise AttributeError(name)
        return getattr(getattr(self, self._wrapped), name)


class KeyedBatch(list):
    """The sample indices of one batch and its key (seed, rank, epoch, position); travels to the loader workers."""

    def __init__(self, indices, key: Tuple[int, int, int, int]):
        super().__init__(indices)
        self.key = key


class EpochBatches(_Wrapper, Sampler):
    """timm's batch sampler made a function of (seed, epoch), with keyed batches and a starting position.

    `set_epoch(epoch, start)`: the next pass yields the epoch's batches from position `start` on; later passes of
    the same epoch (BatchNorm re-estimation on the training loader) start at 0 again.
    """
    _wrapped = 'batch_sampler'

    def __init__(self, batch_sampler, seed: int, rank: int):
        self.batch_sampler, self.seed, self.rank = batch_sampler, seed, rank
        self.epoch = self.start = self.erased = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        inner = self.batch_sampler  # timm's ScheduledBatchSampler tells its sampler; else DistributedSampler etc.
        target = inner if hasattr(inner, 'set_epoch') else inner.sampler
        if hasattr(target, 'set_epoch'):
            target.set_epoch(epoch)

    def __iter__(self):  # a generator: the body runs at the first batch (DataLoader may call iter() twice per pass)
        start, self.start = self.start, 0
        self.erased = start  # the prefetcher erases batches in order, from the first one yielded
        base = getattr(self.batch_sampler, 'sampler', None)
        if isinstance(base, RandomSampler):  # timm's non-distributed shuffle: else drawn from the global generator
            base.generator = torch.Generator().manual_seed(key_seed(self.seed, self.epoch, _ORDER))
        for position, indices in enumerate(self.batch_sampler):
            if position >= start:
                yield KeyedBatch(indices, (self.seed, self.rank, self.epoch, position))


class SeededBatches(_Wrapper, Dataset):
    """The training dataset loading whole batches: samples and collate (mixup) drawn from the batch's key.

    `mixup_off_epoch`: the collate's mixup is off from that epoch on, decided per batch from its epoch (a flag set
    in the main process would not reach persistent worker processes).
    """
    _wrapped = 'dataset'

    def __init__(self, dataset: Dataset, collate_fn: Callable, mixup_off_epoch: int = 0):
        self.dataset, self.collate_fn, self.mixup_off_epoch = dataset, collate_fn, mixup_off_epoch

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, batch: KeyedBatch):
        seed, rank, epoch, position = batch.key
        _seed(key_seed(seed, rank, epoch, position, _DATA))
        if self.mixup_off_epoch and hasattr(self.collate_fn, 'mixup_enabled'):
            self.collate_fn.mixup_enabled = epoch < self.mixup_off_epoch
        return self.collate_fn([self.dataset[i] for i in batch])


def _collated(batch):
    """The DataLoader's collate: `SeededBatches` has collated the batch already."""
    return batch


class SeededErasing:
    """The prefetcher's random erasing (on the device, in the main process), seeded from the batch's position."""

    def __init__(self, erasing: Callable, batches: EpochBatches):
        self.erasing, self.batches = erasing, batches

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batches
        _seed(key_seed(b.seed, b.rank, b.epoch, b.erased, _ERASING), x.device)
        b.erased += 1
        return self.erasing(x)


class SeededLoader(_Wrapper):
    """The training loader with keyed draws: iterating it seeds the main process's generators from each batch's key
    just before yielding it, so the step that consumes the batch (mixup without the prefetcher, dropout,
    stochastic depth) draws from that state. Other attributes are the wrapped loader's."""
    _wrapped = 'loader'

    def __init__(self, loader, batches: EpochBatches, device: torch.device):
        self.loader, self.batches, self.device = loader, batches, device

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.batches.set_epoch(epoch, start)

    def __iter__(self):
        b = self.batches
        for position, batch in enumerate(self.loader, start=b.start):  # b.start: read before the pass begins
            _seed(key_seed(b.seed, b.rank, b.epoch, position, _STEP), self.device)
            yield batch


def seeded_loader(loader, seed: int, rank: int, mixup_off_epoch: int, device: torch.device):
    """timm's training loader (`create_loader`'s DataLoader or PrefetchLoader) with every draw keyed: a
    `SeededLoader` (the loader itself for an iterable dataset, which has no batch sampler to key)."""
    from timm.data.loader import PrefetchLoader
    base = loader.loader if isinstance(loader, PrefetchLoader) else loader
    if isinstance(base.dataset, IterableDataset):
        return loader
    batches = EpochBatches(base.batch_sampler, seed, rank)
    workers = dict(prefetch_factor=base.prefetch_factor, persistent_workers=base.persistent_workers,
                   worker_init_fn=base.worker_init_fn) if base.num_workers else {}
    keyed = DataLoader(SeededBatches(base.dataset, base.collate_fn, mixup_off_epoch), batch_sampler=batches,
                       collate_fn=_collated, num_workers=base.num_workers, pin_memory=base.pin_memory, **workers)
    if base is loader:
        return SeededLoader(keyed, batches, device)
    loader.loader = keyed
    if loader.random_erasing is not None:
        loader.random_erasing = SeededErasing(loader.random_erasing, batches)
    return SeededLoader(loader, batches, device)


def set_loader_epoch(loader, epoch: int, start: int = 0) -> None:
    """Tell the training loader the epoch (and the batch position its next pass starts at)."""
    if isinstance(loader, SeededLoader):
        loader.set_epoch(epoch, start)
        return
    for target in (getattr(loader, 'dataset', None), getattr(loader, 'sampler', None)):  # as timm's train.py
        if hasattr(target, 'set_epoch'):
            target.set_epoch(epoch)
