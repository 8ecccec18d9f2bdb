"""One analysis, checked and built before anything is evaluated: data, models, space, sub-networks.

`prepare_study(args)` takes the options of `timm-st analyze` (an argparse namespace: SOURCES, groups,
data, space, BatchNorm modes, model options) and returns a `Study`: the sources with their models
loaded (`sources.load_source`), the data to evaluate on (defaults: the first run folder's), the
space (`--space`, else the first run's recipe space, else `default`) and the plans, the full network
first, then every member of the space (at most `ALL_SUBNETS_LIMIT`, else that many drawn with the
seed), in tree order. Every source is compared on exactly these plans, so all must share one stage
layout and predict the data's classes. Any refusal is a one-line `RunError` (exit code 2), raised
before any evaluation.
"""
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import yaml

from ..method.adapters import Stage, stage_depths, subnet_stages
from ..method.plan import SubnetPlan
from ..method.sampling import list_sample_spaces, resolve_sample_space
from ..runs.data import DIGITS, class_names, create_split, dataset_location, is_remote
from ..runs.errors import RunError
from ..runs.validation import check_analysis_options, check_calibration_split
from .evaluation import BN_MODES, subnet_plans
from .sources import Source, collect_sources, first_line, first_run_args, load_source

__all__ = ['Study', 'AnalysisData', 'prepare_study', 'space_size', 'ALL_SUBNETS_LIMIT']

ALL_SUBNETS_LIMIT = 512  # `--subnets` default: every member up to this many, else this many drawn


@dataclass
class AnalysisData:
    """The data every source is evaluated on: a timm dataset (`name`, '' for an image folder, at `root`), the
    evaluated `split`, the `train_split` BatchNorm statistics are re-estimated on, loader settings, and how the
    outputs name the dataset (`shown`)."""
    name: str
    root: Optional[str]
    split: str
    train_split: str
    class_map: str
    batch_size: int
    workers: int
    shown: str

    def dataset(self, split: str, img_mode: str):
        return create_split(self.name, self.root, split, img_mode, class_map=self.class_map, shown=self.shown)


@dataclass
class Study:
    """Everything one analysis evaluates (see the module docstring)."""
    sources: List[Source]
    data: AnalysisData
    modes: List[str]  # BatchNorm modes, of analysis.evaluation.BN_MODES
    space: Any
    space_from: str
    max_drop: Tuple[int, ...]
    plans: List[SubnetPlan]
    plans_described: str  # 'all' or 'N drawn with seed S'
    num_classes: Optional[int]
    train_size: Optional[int]  # training images available for re-estimation


def _data(args, run_args) -> AnalysisData:
    name = args.dataset if args.dataset is not None else (run_args.get('dataset') or '')
    root = args.data_dir if args.data_dir is not None else run_args.get('data_dir')
    if name == DIGITS:
        shown = 'digits (embedded)'
        name, root = dataset_location(name, root)
    else:
        # a dataset timm reads by itself needs no root, except torchvision's (downloaded into it)
        if not root and (not is_remote(name) or name.startswith('torch/')):
            raise RunError('no data: give --data-dir DIR (an image folder with a validation/ split, or the root of '
                           '--dataset NAME), or --dataset digits for the embedded demo data')
        shown = f'{name or "image folder"} at {root}'
    batch_size = args.batch_size or run_args.get('validation_batch_size') or run_args.get('batch_size') or 256
    return AnalysisData(
        name=name, root=root, split=args.split or run_args.get('val_split') or 'validation',
        train_split=args.train_split or run_args.get('train_split') or 'train', class_map=run_args.get('class_map') or '',
        batch_size=int(batch_size), workers=int(args.workers if args.workers is not None else run_args.get('workers', 4)),
        shown=shown)


def _parse_space(text: str):
    if text in list_sample_spaces():
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise RunError(f'--space {text!r}: give a named space ({", ".join(list_sample_spaces())}) or a mapping such '
                       f'as \'{{"max_drop": [1, 2, 4, 1]}}\' or \'{{"min_keep": [2, 2, 2, 2]}}\'')
    return value


def _recipe_space(sources: Sequence[Source]) -> Tuple[Any, str]:
    """The first run folder's recipe space, else 'default'."""
    run = next((s for s in sources if s.run is not None), None)
    space = (run.run.args.get('stimulative') or {}).get('sample_space') if run is not None else None
    if space is not None:
        return space, f'the recipe of {run.label}'
    return 'default', 'default (no --space, no recipe space)'


def space_size(max_drop: Sequence[int]) -> int:
    """Members of a space with `max_drop` droppable blocks per stage (the full network included)."""
    return math.prod(m + 1 for m in max_drop)


def _plans(subnets: Optional[str], stages: Sequence[Stage], space, max_drop, seed: int) -> Tuple[List[SubnetPlan], str]:
    """The full network first, then the evaluated sub-networks, in tree order; `subnets` is 'all' or a count
    (checked by `check_analysis_options`)."""
    size = space_size(max_drop)
    choice = subnets if subnets is not None else ('all' if size <= ALL_SUBNETS_LIMIT else str(ALL_SUBNETS_LIMIT))
    plans = subnet_plans(stages, space, None if choice == 'all' else int(choice), seed=seed)
    return plans, 'all' if len(plans) == size else f'{len(plans) - 1} drawn with seed {seed}'


def _common_stages(sources: Sequence[Source], data: AnalysisData, num_classes: Optional[int]) -> List[Stage]:
    """The sub-network stages of the first source; every source must have the same layout and predict the
    data's classes."""
    depths, stages = {}, None
    for s in sources:
        try:
            layout = subnet_stages(s.model)
        except ValueError as e:
            raise RunError(f'{s.label}: {first_line(e)}') from None
        stages = stages or layout
        depths[s.label] = stage_depths(layout)
        outputs = getattr(s.model, 'num_classes', None)
        if num_classes is not None and outputs is not None and outputs != num_classes:
            raise RunError(f'{s.label} predicts {outputs} classes but split {data.split!r} of {data.shown} has '
                           f'{num_classes}; point --data-dir/--dataset at the data the model was trained on')
    if len(set(depths.values())) > 1:
        raise RunError(f'the SOURCES have different stage layouts ({depths}); sources are compared on the same '
                       f'sub-networks, so analyse each layout in its own command')
    return stages


def prepare_study(args) -> Study:
    """Check every input and build everything before any evaluation (module docstring)."""
    check_analysis_options(args)
    space = _parse_space(args.space) if args.space is not None else None
    sources = collect_sources(args.sources, args.group, args.pretrained)
    data = _data(args, first_run_args(sources))
    modes = list(BN_MODES) if args.bn == 'both' else [args.bn]
    # the datasets read here are only counted and their class names compared: no image is decoded, so the image
    # mode (each source's own, from its data config, for its loaders) does not matter yet
    dataset = data.dataset(data.split, 'RGB')
    names = class_names(dataset)
    num_classes = len(names) if names else None
    train_size = None
    if 'recalibrate' in modes:
        train_size = check_calibration_split(data.name, data.root, data.split, data.train_split, dataset,
                                             class_map=data.class_map, shown=data.shown)
    for s in sources:
        load_source(s, model_name=args.model, checkpoint=args.checkpoint, ema=args.ema, num_classes=num_classes)
    stages = _common_stages(sources, data, num_classes)
    space, space_from = (space, '--space') if space is not None else _recipe_space(sources)
    try:
        max_drop = resolve_sample_space(space, stages)
    except ValueError as e:
        raise RunError(f'{first_line(e)} (space from {space_from}); pick one that fits '
                       f'with --space') from None
    plans, described = _plans(args.subnets, stages, space, max_drop, args.seed)
    return Study(sources=sources, data=data, modes=modes, space=space, space_from=space_from, max_drop=tuple(max_drop),
                 plans=plans, plans_described=described, num_classes=num_classes, train_size=train_size)
