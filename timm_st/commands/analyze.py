"""`timm-st analyze`: how much a trained model's sub-networks loaf, for any timm model.

Every SOURCE (a run folder of `timm-st train` or of timm's `train.py`, a checkpoint file with
`--model`, a `local-dir:`/`hf-hub:` model, or a timm model name with `--pretrained`) is evaluated on
exactly the same sub-networks of one explicit space, with the model's running BatchNorm statistics
and/or statistics re-estimated per sub-network. Runs can be grouped (`--group NAME RUN...`, one
group per arm, one run per seed) so every statistic is reported as mean +- std over seeds.

Writes `analysis.json`, `subnets.csv` and PNG plots to `--output`, and prints a short table.
Every input is checked before any evaluation: a bad one is a one-line error and exit status 2.
"""
import argparse
import csv
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

import timm
from timm import utils
from timm.data.dataset_factory import _search_split

from ..analysis.evaluation import evaluate_plans, relative_flops, subnet_plans, subnet_statistics
from ..analysis.lesions import lesion_study
from ..method.adapters import stage_depths, subnet_stages
from ..method.plan import SubnetPlan
from ..method.sampling import list_sample_spaces, resolve_sample_space
from ..runs.build import build_model
from ..runs.checkpoints import load_weights
from ..runs.data import (FixedSubset as _FixedSubset, calibration_loader, class_names as _class_names, create_split,
                         data_config as _resolve_data_config, eval_loader, fixed_subset, image_mode)
from ..runs.digits import materialize_digits
from ..runs.errors import RunError as AnalyzeError
from ..runs.folder import RunFolder, read_run
from ..runs.loggers import setup_logging
from ..runs.options import CALIB_IMAGES
from ..runs.validation import check_output_folder

__all__ = ['main', 'build_parser', 'AnalyzeError', 'group_statistics', 'shard_bounds']

_logger = logging.getLogger(__name__)

BN_MODES = ('running', 'recalibrate')
ALL_SUBNETS_LIMIT = 512  # `--subnets` default: every member up to this many, else this many drawn
STATISTICS = ('full_top1', 'subnet_mean', 'subnet_std', 'subnet_min', 'subnet_max', 'loafing_gap')
COSTS = ('epochs', 'img_per_sec', 'train_time')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='timm-st analyze',
        description='Evaluate every sub-network of one or more models on the same space: accuracy against '
                    'FLOPs, BatchNorm modes, lesions, and several runs per arm as mean +- std over seeds.')
    p.add_argument('sources', nargs='*', metavar='SOURCE',
                   help='a run folder (timm-st train or timm train.py), a checkpoint file (with --model), '
                        'local-dir:PATH / hf-hub:ID, or a timm model name (with --pretrained)')
    p.add_argument('--group', nargs='+', action='append', default=[], metavar=('NAME', 'SOURCE'),
                   help='a named group of SOURCES (e.g. one run per seed of an arm); statistics are reported '
                        'as mean +- std over its members. Repeat for each arm: --group ct RUN... --group st RUN...')
    data = p.add_argument_group('data (defaults: the first run folder\'s)')
    data.add_argument('--data-dir', default=None, help='dataset root; optional for --dataset digits')
    data.add_argument('--dataset', default=None, help="timm dataset name ('' = image folder; 'digits' = the demo)")
    data.add_argument('--split', default=None, help='split to evaluate on (default: the run\'s val_split, else validation)')
    data.add_argument('--train-split', default=None, help='split whose images re-estimate BatchNorm (default: train)')
    data.add_argument('--batch-size', type=int, default=None, help='evaluation batch size (default: the run\'s, else 256)')
    data.add_argument('--workers', type=int, default=None, help='loader processes (default: the run\'s, else 4)')
    data.add_argument('--max-samples', type=int, default=None,
                      help='evaluate on a fixed random subset of N images (--seed), the same for every source')
    space = p.add_argument_group('sub-networks')
    space.add_argument('--space', default=None,
                       help=f'{"|".join(list_sample_spaces())} or a mapping such as \'{{"max_drop": [4, 4, 4]}}\' '
                            '(default: the first run\'s recipe space, else default)')
    space.add_argument('--subnets', default=None,
                       help=f'"all", or N distinct sub-networks (besides the full network) drawn with --seed (default: all when the space has at '
                            f'most {ALL_SUBNETS_LIMIT} members, else {ALL_SUBNETS_LIMIT})')
    space.add_argument('--bn', choices=BN_MODES + ('both',), default='running',
                       help='BatchNorm statistics of each sub-network: the model\'s running ones, re-estimated '
                            'for every sub-network on --calib-images training images, or both')
    space.add_argument('--calib-images', type=int, default=CALIB_IMAGES,
                       help='training images per re-estimation (a fixed random subset, under the run\'s training '
                            'augmentation, seeded)')
    space.add_argument('--lesion', action='store_true',
                       help='also remove blocks singly, k at random and swap neighbours (Veit et al. 2016)')
    space.add_argument('--seed', type=int, default=0, help='seed of drawn sub-networks, calibration images, lesions')
    model = p.add_argument_group('model')
    model.add_argument('--model', default=None, help='timm model name of checkpoint-file SOURCES')
    model.add_argument('--pretrained', action='store_true', help='timm model-name SOURCES load pretrained weights')
    model.add_argument('--checkpoint', choices=('best', 'last'), default='best',
                       help='which checkpoint of a run folder: model_best (default) or last')
    model.add_argument('--ema', action='store_true', help='use the EMA weights of run folders / checkpoints')
    run = p.add_argument_group('run')
    run.add_argument('--device', default=None, help='cuda, cpu, ... (default: cuda when available)')
    run.add_argument('--amp', action='store_true', help='evaluate under autocast')
    run.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), default='float16')
    run.add_argument('--channels-last', action='store_true')
    run.add_argument('--output', default=None, help='output folder (default: output/analyze/<time>)')
    return p


# ---------------------------------------------------------------------------------------------
# statistics (pure functions, so they are tested against independent computations)

def group_statistics(members: Sequence[Mapping[str, Optional[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """For every key of the members' statistics: mean and sample std (n - 1) over the members (seeds);
    std is None for a single member, and a key missing in any member is None."""
    out = {}
    keys = list(dict.fromkeys(k for m in members for k in m))
    for key in keys:
        values = [m.get(key) for m in members]
        if not values or any(v is None for v in values):
            out[key] = {'mean': None, 'std': None, 'n': len(values)}
            continue
        values = [float(v) for v in values]
        out[key] = {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else None,
                    'n': len(values)}
    return out


def shard_bounds(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous share `[start, stop)` of `count` items for `rank`: contiguous, so the sub-networks a rank
    evaluates share prefixes (tree evaluation), and concatenating the shares in rank order restores the order."""
    return count * rank // world_size, count * (rank + 1) // world_size


def _gather_shards(share: List[Any], world_size: int) -> List[Any]:
    """Every rank's share, concatenated in rank order (on every rank)."""
    if world_size == 1:
        return list(share)
    shares: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(shares, share)
    return [item for s in shares for item in s]


# ---------------------------------------------------------------------------------------------
# sources

@dataclass
class Source:
    """One model to analyse and where it came from."""
    spec: str
    kind: str  # 'run folder (timm-st train)', 'run folder (train.py)', 'checkpoint', 'hub', 'timm pretrained'
    group: str
    label: str = ''
    model: Optional[nn.Module] = None
    run: Optional[RunFolder] = None
    checkpoint: Optional[str] = None
    model_name: str = ''
    data_config: Dict[str, Any] = field(default_factory=dict)
    input_img_mode: Optional[str] = None


def _fail(message: str) -> None:
    raise AnalyzeError(message)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _source_kind(spec: str, args) -> str:
    path = Path(spec)
    if path.is_dir():
        return 'run'
    if path.is_file():
        return 'checkpoint'
    if spec.startswith(('local-dir:', 'hf-hub:')):
        return 'hub'
    if os.sep in spec or spec.endswith(('.pth', '.tar', '.pt', '.bin', '.safetensors')):
        _fail(f'SOURCE {spec!r} does not exist; give an existing run folder or checkpoint file')
    if not args.pretrained:
        _fail(f'SOURCE {spec!r} is not a folder or file; to analyse the timm model {spec!r} with its pretrained '
              f'weights add --pretrained (a randomly initialised model has nothing to measure)')
    return 'pretrained'


def _collect_sources(args) -> List[Source]:
    entries = [(spec, None) for spec in args.sources]
    for group in args.group:
        if len(group) < 2:
            _fail(f'--group {group[0]!r} names no SOURCE; write --group NAME SOURCE [SOURCE ...]')
        entries += [(spec, group[0]) for spec in group[1:]]
    if not entries:
        _fail('no SOURCE given; name at least one run folder, checkpoint (with --model) or model')
    sources = []
    for spec, group in entries:
        kind = _source_kind(spec, args)
        name = Path(spec).name if kind in ('run', 'checkpoint') else spec
        sources.append(Source(spec=spec, kind=kind, group=group or name, label=name))
    labels = [s.label for s in sources]
    for s in sources:  # a name used twice: label with the full path instead
        if labels.count(s.label) > 1:
            s.label = s.spec
    if len({s.label for s in sources}) != len(sources):
        _fail('the same SOURCE is given twice; name each once')
    return sources


def _read_runs(sources: List[Source], args) -> None:
    for s in sources:
        if s.kind != 'run':
            continue
        try:
            s.run = read_run(s.spec)
        except AnalyzeError as e:
            _fail(str(e))
        s.kind = f'run folder ({s.run.written_by})'


def _first_run_args(sources: List[Source]) -> Mapping[str, Any]:
    return next((s.run.args for s in sources if s.run is not None), {})


# ---------------------------------------------------------------------------------------------
# data

@dataclass
class DataSpec:
    name: str
    root: Optional[str]
    split: str
    train_split: str
    class_map: str
    batch_size: int
    workers: int
    shown: str  # how the output names the dataset


def _data_spec(args, run_args: Mapping[str, Any]) -> DataSpec:
    name = args.dataset if args.dataset is not None else (run_args.get('dataset') or '')
    root = args.data_dir if args.data_dir is not None else run_args.get('data_dir')
    if name == 'digits':
        root, name, shown = str(materialize_digits(root)), '', 'digits (embedded)'
    else:
        if not root and not name.startswith(('hfds/', 'hfids/', 'tfds/', 'wds/')):
            _fail('no data: give --data-dir DIR (an image folder with a validation/ split, or the root of '
                  '--dataset NAME), or --dataset digits for the embedded demo data')
        shown = f'{name or "image folder"} at {root}'
    split = args.split or run_args.get('val_split') or 'validation'
    train_split = args.train_split or run_args.get('train_split') or 'train'
    batch_size = args.batch_size or run_args.get('validation_batch_size') or run_args.get('batch_size') or 256
    workers = args.workers if args.workers is not None else run_args.get('workers', 4)
    return DataSpec(name, root, split, train_split, run_args.get('class_map') or '', int(batch_size), int(workers),
                    shown)


def _create_dataset(data: DataSpec, split: str, input_img_mode: str):
    return create_split(data.name, data.root, split, input_img_mode, class_map=data.class_map, shown=data.shown)


def _dataset_classes(dataset) -> Optional[int]:
    names = _class_names(dataset)
    return len(names) if names else None


def _loader(dataset, data_config: Mapping[str, Any], data: DataSpec, device: torch.device, distributed: bool = False):
    return eval_loader(dataset, data_config, data.batch_size, data.workers, device, distributed)


# ---------------------------------------------------------------------------------------------
# models

def _load_models(sources: List[Source], args, num_classes: Optional[int]) -> None:
    for s in sources:
        try:
            if s.run is not None:
                s.checkpoint = str(s.run.checkpoint_path(args.checkpoint))
                s.model_name = s.run.args['model']
                s.model = build_model(s.run.args, state_dict=s.run.load_state_dict(args.checkpoint, args.ema))
            elif s.kind == 'checkpoint':
                if not args.model:
                    _fail(f'SOURCE {s.spec!r} is a checkpoint file; name its architecture with --model NAME')
                s.checkpoint, s.model_name = s.spec, args.model
                state = load_weights(s.spec, args.ema)
                s.model = build_model({'model': args.model}, num_classes=num_classes, state_dict=state)
            else:  # a published model: timm resolves local-dir:, hf-hub: and pretrained tags itself
                s.model_name = s.spec
                s.model = timm.create_model(s.spec, pretrained=True)
        except AnalyzeError as e:
            _fail(f'{s.label}: {e}' if s.run is not None else str(e))
        except Exception as e:  # timm / the hub: unknown model, missing files, no pretrained weights, no network
            _fail(f'cannot load the model {s.spec!r} ({_first_line(e)[:300]}); check the name, path or hub id')
        s.model.eval()
        run_args = dict(s.run.args) if s.run is not None else {}
        # a run is evaluated with the preprocessing its training evaluated with (train.py resolves without the
        # test size); any other model as timm's validate.py resolves it from its pretrained_cfg
        s.data_config = _resolve_data_config(run_args, s.model, use_test_size=s.run is None)
        s.input_img_mode = image_mode(run_args.get('input_img_mode'), s.data_config)


def _num_outputs(model: nn.Module) -> Optional[int]:
    return getattr(model, 'num_classes', None)


# ---------------------------------------------------------------------------------------------
# the space

def _parse_space(text: str):
    if text in list_sample_spaces():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        _fail(f'--space {text!r}: give a named space ({", ".join(list_sample_spaces())}) or a mapping such as '
              f'\'{{"max_drop": [1, 2, 4, 1]}}\' or \'{{"min_keep": [2, 2, 2, 2]}}\'')
    return value


def _choose_space(args, sources: List[Source]) -> Tuple[Any, str]:
    if args.space is not None:
        return _parse_space(args.space), '--space'
    for s in sources:
        if s.run is not None:
            space = (s.run.args.get('stimulative') or {}).get('sample_space')
            if space is not None:
                return space, f'the recipe of {s.label}'
            break
    return 'default', 'default (no --space, no recipe space)'


def _space_size(max_drop: Sequence[int]) -> int:
    return math.prod(m + 1 for m in max_drop)


def _plans(args, stages, space, max_drop) -> Tuple[List[SubnetPlan], str]:
    """The full network first, then the evaluated sub-networks, in tree order."""
    size = _space_size(max_drop)
    choice = args.subnets
    if choice is None:
        choice = 'all' if size <= ALL_SUBNETS_LIMIT else str(ALL_SUBNETS_LIMIT)
    count = None
    if choice != 'all':
        try:
            count = int(choice)
        except ValueError:
            count = 0
        if count < 1:
            _fail(f'--subnets {choice!r}: give "all" or a positive number of sub-networks')
    plans = subnet_plans(stages, space, count, seed=args.seed)
    described = 'all' if len(plans) == size else f'{len(plans) - 1} drawn with seed {args.seed}'
    return plans, described


# ---------------------------------------------------------------------------------------------
# the run

def _validate_inputs(args):
    if args.calib_images < 1:
        _fail(f'--calib-images {args.calib_images}: give a positive number of training images')
    if args.max_samples is not None and args.max_samples < 1:
        _fail(f'--max-samples {args.max_samples}: give a positive number of images')
    if args.batch_size is not None and args.batch_size < 1:
        _fail(f'--batch-size {args.batch_size}: give a positive batch size')
    check_output_folder(args.output, '--output')


def prepare(args) -> Dict[str, Any]:
    """Everything checked and built before any evaluation: sources, models, space, plans, data."""
    _validate_inputs(args)
    sources = _collect_sources(args)
    _read_runs(sources, args)
    run_args = _first_run_args(sources)
    data = _data_spec(args, run_args)
    modes = list(BN_MODES) if args.bn == 'both' else [args.bn]
    img_mode = run_args.get('input_img_mode') or ('L' if run_args.get('in_chans') == 1 else 'RGB')
    dataset = _create_dataset(data, data.split, img_mode)
    num_classes = _dataset_classes(dataset)
    train_size = None
    if 'recalibrate' in modes:
        train_size = _check_calibration_split(data, img_mode, dataset)
    _load_models(sources, args, num_classes)

    layouts = {}
    for s in sources:
        try:
            stages = subnet_stages(s.model)
        except ValueError as e:
            _fail(f'{s.label}: {_first_line(e)}')
        layouts[s.label] = stages
        outputs = _num_outputs(s.model)
        if num_classes is not None and outputs is not None and outputs != num_classes:
            _fail(f'{s.label} predicts {outputs} classes but split {data.split!r} of {data.shown} has '
                  f'{num_classes}; point --data-dir/--dataset at the data the model was trained on')
    depths = {label: stage_depths(st) for label, st in layouts.items()}
    if len(set(depths.values())) > 1:
        _fail(f'the SOURCES have different stage layouts ({depths}); sources are compared on the same '
              f'sub-networks, so analyse each layout in its own command')
    stages = layouts[sources[0].label]
    space, space_from = _choose_space(args, sources)
    try:
        max_drop = resolve_sample_space(space, stages)
    except ValueError as e:
        _fail(f'{_first_line(e)} (space from {space_from}); pick one that fits with --space')
    plans, described = _plans(args, stages, space, max_drop)
    return dict(sources=sources, data=data, modes=modes, space=space, space_from=space_from, max_drop=max_drop,
                plans=plans, plans_described=described, num_classes=num_classes, train_size=train_size)


def _check_calibration_split(data: DataSpec, img_mode: str, eval_dataset) -> int:
    """The number of training images for re-estimation; an error when the split is absent or holds other classes."""
    fix = 'fix --data-dir / --train-split, or use --bn running'
    if not data.name and data.root and os.path.isdir(data.root):
        # timm reads an image folder without that split subfolder as the whole folder: that would re-estimate on
        # the evaluation images themselves
        calib_root, eval_root = _search_split(data.root, data.train_split), _search_split(data.root, data.split)
        if os.path.samefile(calib_root, data.root) or os.path.samefile(calib_root, eval_root):
            _fail(f'--bn recalibrate needs training images: {data.shown} has no {data.train_split}/ folder '
                  f'(timm would read the evaluation images instead); {fix}')
    try:
        train = _create_dataset(data, data.train_split, img_mode)
    except AnalyzeError as e:
        raise AnalyzeError(f'--bn recalibrate needs training images: {e}; or use --bn running') from None
    ours, theirs = _class_names(train), _class_names(eval_dataset)
    if ours is not None and theirs is not None and ours != theirs:
        _fail(f'--bn recalibrate needs training images: split {data.train_split!r} of {data.shown} has classes '
              f'{ours[:5]}{"..." if len(ours) > 5 else ""} but split {data.split!r} has {len(theirs)} others '
              f'(no {data.train_split}/ folder?); {fix}')
    return len(train)


def _loaders(source: Source, data: DataSpec, args, device, need_calibration: bool):
    """The evaluation loader (all of --split, or the fixed --max-samples subset) and, for recalibration, the
    loader of the fixed --calib-images subset of --train-split under the run's training augmentation."""
    dataset = _create_dataset(data, data.split, source.input_img_mode)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = _FixedSubset(dataset, fixed_subset(len(dataset), args.max_samples, args.seed))
    calib_loader = None
    if need_calibration:
        train = _create_dataset(data, data.train_split, source.input_img_mode)
        calib_loader = calibration_loader(train, source.run.args if source.run is not None else {},
                                          source.data_config, args.calib_images, args.seed, data.batch_size,
                                          data.workers, device)
    return _loader(dataset, source.data_config, data, device), calib_loader


def _evaluate_source(source: Source, plans: List[SubnetPlan], modes: List[str], data: DataSpec, args, device,
                     autocast, progress) -> Dict[str, Any]:
    """Per BN mode, the metrics of this rank's share of the plans, and (rank 0) the lesion study."""
    model = source.model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    eval_loader, calib_loader = _loaders(source, data, args, device, 'recalibrate' in modes)
    start, stop = shard_bounds(len(plans), args.rank, args.world_size)
    batches = {'running': len(eval_loader), 'recalibrate': len(eval_loader) + (len(calib_loader) if calib_loader else 0)}
    progress.total = (progress.total or 0) + (stop - start) * sum(batches[m] for m in modes)  # units: subnet x batch
    progress.refresh()
    per_mode, info = {}, {}
    for mode in modes:
        progress.set_description(f'{source.label} [BN {mode}]')
        if mode == 'recalibrate':
            utils.random_seed(args.seed)  # torch, numpy, random: the same augmented calibration batches every time
        per_mode[mode] = evaluate_plans(
            model, plans[start:stop], eval_loader, device, bn=mode, calib_loader=calib_loader,
            calib_images=args.calib_images, autocast=autocast, channels_last=args.channels_last, progress=progress,
            info=info)
    lesion = None
    if args.lesion and args.rank == 0:
        progress.set_description(f'{source.label} [lesions]')
        lesion = lesion_study(model, eval_loader, device, seed=args.seed, autocast=autocast,
                              channels_last=args.channels_last)
    model.cpu()
    return {'per_mode': per_mode, 'lesion': lesion,
            'evaluation': {'method': info.get('method'), 'reason': info.get('reason')}}


def _run_cost(run: Optional[RunFolder]) -> Dict[str, Optional[float]]:
    """Epochs trained, mean images/s and total training time, from the run's summary.csv (None where it lacks them)."""
    if run is None:
        return {k: None for k in COSTS}
    epochs = run.column('epoch')
    img_per_sec = run.column('train_img_per_sec')  # timm-st train's train metrics, as timm's update_summary names them
    epoch_time = run.column('train_epoch_time')
    clean = lambda values: [float(v) for v in values if v is not None] if values else []
    img_per_sec, epoch_time = clean(img_per_sec), clean(epoch_time)
    return {'epochs': len(epochs) if epochs else None,
            'img_per_sec': statistics.fmean(img_per_sec) if img_per_sec else None,
            'train_time': sum(epoch_time) if epoch_time else None}


def analyze(args, argv: Sequence[str]) -> Dict[str, Any]:
    """Check everything, evaluate every source on the same plans, write the outputs (rank 0); returns the analysis."""
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = utils.init_distributed_device(args)
    primary = args.rank == 0
    setup = prepare(args)
    sources, plans, modes, data = setup['sources'], setup['plans'], setup['modes'], setup['data']

    autocast = nullcontext
    if args.amp:
        dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
    output_dir = Path(args.output or Path('output') / 'analyze' / time.strftime('%Y%m%d-%H%M%S'))

    from tqdm import tqdm
    flops_cache: Dict[Tuple, List[float]] = {}
    per_source = []
    with tqdm(total=0, unit='subnet-batch', disable=None if primary else True, dynamic_ncols=True) as progress:
        for s in sources:
            key = (s.model_name, tuple(s.data_config['input_size']))
            if key not in flops_cache:
                flops_cache[key] = relative_flops(s.model, plans, s.data_config['input_size'])
            measured = _evaluate_source(s, plans, modes, data, args, device, autocast, progress)
            measured['per_mode'] = {m: _gather_shards(r, args.world_size) for m, r in measured['per_mode'].items()}
            per_source.append((s, flops_cache[key], measured))
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not primary:
        return {}
    analysis = _assemble(setup, per_source, args, argv)
    _write_outputs(analysis, per_source, output_dir)
    print(format_table(analysis), flush=True)
    print(f'Analysis: {output_dir / "analysis.json"}', flush=True)
    return analysis


def _assemble(setup, per_source, args, argv) -> Dict[str, Any]:
    plans, modes = setup['plans'], setup['modes']
    sources_out = []
    for s, flops, measured in per_source:
        subnets = []
        for i, plan in enumerate(plans):
            entry = {'depths': list(plan.depths), 'full': i == 0, 'relative_flops': flops[i]}
            for mode in modes:
                m = measured['per_mode'][mode][i]
                entry[mode] = {'top1': m['top1'], 'top5': m['top5'], 'loss': m['loss'], 'samples': m['samples']}
            subnets.append(entry)
        stats = {mode: subnet_statistics(subnets[0][mode]['top1'], [e[mode]['top1'] for e in subnets[1:]])
                 for mode in modes}
        sources_out.append({
            'label': s.label, 'source': s.spec, 'kind': s.kind, 'group': s.group, 'model': s.model_name,
            'checkpoint': s.checkpoint, 'ema': bool(args.ema) if s.checkpoint else False,
            'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in s.data_config.items()},
            'cost': _run_cost(s.run), 'statistics': stats, 'subnets': subnets, 'lesion': measured['lesion'],
            'evaluation': measured['evaluation'],
            'training_curve': _training_curve(s.run),
        })
    groups = []
    for name in dict.fromkeys(s['group'] for s in sources_out):
        members = [s for s in sources_out if s['group'] == name]
        groups.append({'name': name, 'members': [m['label'] for m in members],
                       'statistics': {mode: group_statistics([m['statistics'][mode] for m in members])
                                      for mode in modes},
                       'cost': group_statistics([m['cost'] for m in members])})
    data = setup['data']
    return {
        'command': 'timm-st analyze ' + shlex.join(argv),
        'space': {'spec': setup['space'], 'from': setup['space_from'], 'max_drop': list(setup['max_drop']),
                  'members': _space_size(setup['max_drop']), 'evaluated': setup['plans_described'],
                  'stage_depths': list(plans[0].depths)},
        'bn_modes': modes,
        'calibration': (_calibration_description(args, data, setup['train_size']) if 'recalibrate' in modes
                        else None),
        'data': {'dataset': data.shown, 'split': data.split, 'classes': setup['num_classes'],
                 'max_samples': args.max_samples},
        'sources': sources_out,
        'groups': groups,
    }


def _calibration_description(args, data: DataSpec, train_size: int) -> Dict[str, Any]:
    subset = min(args.calib_images, train_size)
    batch = min(data.batch_size, subset)
    return {'images': subset // batch * batch, 'split': data.train_split, 'batch_size': batch, 'seed': args.seed,
            'transform': "each run's training augmentation (args.yaml; timm's defaults without a run), "
                         'on a fixed random subset, seeded; whole batches'}


def _training_curve(run: Optional[RunFolder]) -> Optional[Dict[str, List]]:
    if run is None or not run.column('eval_top1'):
        return None
    return {'epoch': run.column('epoch'), 'eval_top1': run.column('eval_top1'), 'epoch_time': run.column('train_epoch_time')}


def _write_outputs(analysis: Dict[str, Any], per_source, output_dir: Path) -> None:
    from ..analysis import plots
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / 'analysis.json', 'w') as f:
        json.dump(analysis, f, indent=2)
    modes = analysis['bn_modes']
    with open(output_dir / 'subnets.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['source', 'group', 'depths', 'full', 'relative_flops'] +
                        [f'{k}_{mode}' for mode in modes for k in ('top1', 'top5', 'loss')])
        for s in analysis['sources']:
            for e in s['subnets']:
                writer.writerow([s['label'], s['group'], '-'.join(map(str, e['depths'])), int(e['full']),
                                 f'{e["relative_flops"]:.6f}'] +
                                [f'{e[mode][k]:.4f}' for mode in modes for k in ('top1', 'top5', 'loss')])
    plots.plot_top1_vs_flops(analysis, output_dir / 'top1_vs_flops.png')
    plots.plot_accuracy_profile(analysis, output_dir / 'accuracy_profile.png')
    if any(s['lesion'] for s in analysis['sources']):
        plots.plot_lesions(analysis, output_dir / 'lesions.png')
    if sum(s['training_curve'] is not None for s in analysis['sources']) >= 2:
        plots.plot_training_curves(analysis, output_dir / 'training_curves.png')


# ---------------------------------------------------------------------------------------------
# the table

def _fmt(stat: Optional[Mapping[str, Any]], digits: int = 2, scale: float = 1.0) -> str:
    if stat is None or stat.get('mean') is None:
        return '-'
    text = f'{stat["mean"] * scale:.{digits}f}'
    if stat.get('std') is not None:
        text += f' +- {stat["std"] * scale:.{digits}f}'
    return text


def format_table(analysis: Mapping[str, Any]) -> str:
    """Per group (a single source is a group of one) and BN mode: statistics as mean +- std over members."""
    space = analysis['space']
    head = (f'Space: {json.dumps(space["spec"])} from {space["from"]} (max_drop {space["max_drop"]}, '
            f'{space["members"]} members, evaluated: {space["evaluated"]}); data: {analysis["data"]["dataset"]}, '
            f'split {analysis["data"]["split"]}')
    columns = ['group', 'runs', 'bn', 'full top-1', 'sub mean', 'sub std', 'sub min', 'sub max', 'loafing gap',
               'epochs', 'img/s', 'train time (s)']
    rows = []
    for g in analysis['groups']:
        for mode in analysis['bn_modes']:
            st = g['statistics'][mode]
            rows.append([g['name'], str(len(g['members'])), mode] + [_fmt(st[k]) for k in STATISTICS] +
                        [_fmt(g['cost']['epochs'], 0), _fmt(g['cost']['img_per_sec'], 0),
                         _fmt(g['cost']['train_time'], 0)])
    widths = [max(len(r[i]) for r in rows + [columns]) for i in range(len(columns))]
    line = lambda r: '  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    note = ('mean +- std over the runs of each group (sample std); "sub std" is the spread over sub-networks; '
            'top-1 in %')
    return '\n'.join([head, line(columns), line(['-' * w for w in widths])] + [line(r) for r in rows] + [note])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        analyze(args, argv)
    except AnalyzeError as e:
        print(f'timm-st analyze: error: {e}', file=sys.stderr)
        return 2
    return 0
