"""Measuring a study: every source evaluated on the study's plans, split over the ranks of a torchrun launch.

`measure_study` evaluates, for each source, the plans in every BatchNorm mode (`evaluate_plans`:
the running statistics, or each sub-network's own re-estimated on the one calibration rule,
`runs.data.calibration_loader`), and the lesion study when asked (rank 0). Under torchrun each rank
evaluates one contiguous share of the plans (`shard_bounds`: contiguous, so a rank's sub-networks
share prefixes for tree evaluation) and every rank ends with all shares in plan order
(`gather_shards`). Progress is a bar on a terminal and log lines elsewhere (`Progress`), on rank 0.
`analyze` is the whole analysis: prepare, measure, and (rank 0) assemble and write the report.
"""
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from timm import utils

from ..runs.build import default_device, precision
from ..runs.data import FixedSubset, calibration_loader, eval_loader, fixed_subset
from .evaluation import evaluate_plans, relative_flops
from .lesions import lesion_study
from .report import assemble, write_outputs
from .sources import Source
from .study import Study, prepare_study

__all__ = ['measure_study', 'Measurement', 'Progress', 'shard_bounds', 'gather_shards', 'analyze']

_logger = logging.getLogger(__name__)


def shard_bounds(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous share `[start, stop)` of `count` items for `rank` (module docstring); the shares in rank order
    are the items in order."""
    return count * rank // world_size, count * (rank + 1) // world_size


def gather_shards(share: List[Any], world_size: int) -> List[Any]:
    """Every rank's share, concatenated in rank order (on every rank)."""
    if world_size == 1:
        return list(share)
    shares: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(shares, share)
    return [item for s in shares for item in s]


class Progress:
    """Evaluation progress in sub-network batches: a tqdm bar on a terminal; elsewhere (a log file, a job
    scheduler) a log line when a stage starts and at every tenth of it. Silent when not `enabled` (other ranks)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit='subnet-batch', dynamic_ncols=True)
        self.desc, self.total, self.done, self.logged = '', 0, 0, 0

    def stage(self, desc: str, total: int = 0) -> None:
        """A stage of `total` units begins (one source in one BatchNorm mode; 0: not counted)."""
        self.desc, self.total, self.done, self.logged = desc, total, 0, 0
        if self.bar is not None:
            self.bar.total += total
            self.bar.set_description(desc)
            self.bar.refresh()
        elif self.enabled:
            _logger.info(f'Evaluating {desc}' + (f': {total} sub-network batches' if total else ''))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.total and self.done * 10 // self.total > self.logged:
            self.logged = self.done * 10 // self.total
            _logger.info(f'{self.desc} [{self.done:>5d}/{self.total}] {100 * self.done / self.total:3.0f}%')

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Measurement:
    """What one source measured: per BatchNorm mode, the metrics of every plan in plan order
    (`evaluate_plans`' entries), the lesion study (or None), the evaluation method used, and relative FLOPs."""
    source: Source
    per_mode: Dict[str, List[Dict[str, Any]]]
    lesion: Optional[Dict[str, Any]]
    evaluation: Dict[str, Any]
    flops: List[float]


def _loaders(source: Source, study: Study, args, device: torch.device):
    """The evaluation loader (all of the split, or the fixed `--max-samples` subset) and, for re-estimation, the
    calibration loader (the one calibration rule: the run's training augmentation without mixup)."""
    data = study.data
    dataset = data.dataset(data.split, source.input_img_mode)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = FixedSubset(dataset, fixed_subset(len(dataset), args.max_samples, args.seed))
    calib = None
    if 'recalibrate' in study.modes:
        calib = calibration_loader(data.dataset(data.train_split, source.input_img_mode),
                                   source.run.args if source.run is not None else {}, source.data_config,
                                   args.calib_images, args.seed, data.batch_size, data.workers, device)
    return eval_loader(dataset, source.data_config, data.batch_size, data.workers, device), calib


def _measure_source(source: Source, study: Study, args, device: torch.device, autocast: Callable[[], ContextManager],
                    progress: Progress) -> Tuple[Dict[str, List[Dict[str, Any]]], Optional[Dict], Dict[str, Any]]:
    """Per BatchNorm mode, the metrics of this rank's share of the plans; (rank 0) the lesion study."""
    model = source.model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader, calib = _loaders(source, study, args, device)
    start, stop = shard_bounds(len(study.plans), args.rank, args.world_size)
    per_mode, info = {}, {}
    for mode in study.modes:
        batches = len(loader) + (len(calib) if mode == 'recalibrate' else 0)
        progress.stage(f'{source.label} [BN {mode}]', (stop - start) * batches)
        if mode == 'recalibrate':
            utils.random_seed(args.seed)  # torch, numpy, random: the same augmented calibration batches every time
        per_mode[mode] = evaluate_plans(
            model, study.plans[start:stop], loader, device, bn=mode, calib_loader=calib,
            calib_images=args.calib_images, autocast=autocast, channels_last=args.channels_last, progress=progress,
            info=info)
    lesion = None
    if args.lesion and args.rank == 0:
        progress.stage(f'{source.label} [lesions]')
        lesion = lesion_study(model, loader, device, seed=args.seed, autocast=autocast, channels_last=args.channels_last)
    model.cpu()
    return per_mode, lesion, {'method': info.get('method'), 'reason': info.get('reason')}


def measure_study(study: Study, args, device: torch.device, autocast: Callable[[], ContextManager]
                  ) -> List[Measurement]:
    """Every source of `study` measured (module docstring); every rank returns all plans' metrics."""
    flops_cache: Dict[Tuple, List[float]] = {}
    measured = []
    progress = Progress(enabled=args.rank == 0)
    try:
        for s in study.sources:
            key = (s.model_name, tuple(s.data_config['input_size']))
            if key not in flops_cache:
                flops_cache[key] = relative_flops(s.model, study.plans, s.data_config['input_size'])
            per_mode, lesion, evaluation = _measure_source(s, study, args, device, autocast, progress)
            per_mode = {m: gather_shards(r, args.world_size) for m, r in per_mode.items()}
            measured.append(Measurement(s, per_mode, lesion, evaluation, flops_cache[key]))
    finally:
        progress.close()
    return measured


def analyze(args, command: str) -> Tuple[Optional[Dict[str, Any]], Path]:
    """The whole analysis of `timm-st analyze`'s options `args`: every input checked, every source measured (split
    over the ranks under torchrun), and on rank 0 `analysis.json`, `subnets.csv` and the plots written to
    `args.output` (default output/analyze/<time>). Returns (the analysis, or None on other ranks; the folder)."""
    if args.device is None:
        args.device = default_device()
    device = utils.init_distributed_device(args)
    study = prepare_study(args)
    autocast, _ = precision(device, args.amp, args.amp_dtype)
    output_dir = Path(args.output or Path('output') / 'analyze' / time.strftime('%Y%m%d-%H%M%S'))
    measured = measure_study(study, args, device, autocast)
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if args.rank != 0:
        return None, output_dir
    analysis = assemble(study, measured, command=command, ema=args.ema, max_samples=args.max_samples,
                        calib_images=args.calib_images, seed=args.seed)
    write_outputs(analysis, output_dir)
    return analysis, output_dir
