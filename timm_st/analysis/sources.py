"""The models an analysis measures (SOURCES) and the preprocessing each one is evaluated with.

A SOURCE is a run folder (written by `timm-st train` or by timm's train.py), a checkpoint file (its
architecture named separately), a published model (`local-dir:PATH`, `hf-hub:ID`) or a timm model
name with its pretrained weights. `collect_sources` tells them apart and labels them, `load_source`
builds each model with its weights and its data config.

The one preprocessing rule: a run folder is evaluated as its training evaluated (timm's
`resolve_data_config` on the run's arguments, without the test size, as train.py resolves it);
every other model as timm's validate.py resolves it (its pretrained config, with the test size).
So a run and its `timm-st publish` export get the same numbers (the export's config is the run's
evaluation preprocessing), while a bare checkpoint file, which carries no preprocessing, gets its
architecture's default one. Every refusal is a one-line `RunError` (exit code 2).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from ..runs.build import build_model
from ..runs.checkpoints import load_weights
from ..runs.data import data_config, image_mode
from ..runs.errors import RunError
from ..runs.folder import RunFolder, read_run

__all__ = ['Source', 'collect_sources', 'load_source', 'first_run_args']

_CHECKPOINT_SUFFIXES = ('.pth', '.tar', '.pt', '.bin', '.safetensors')
_PUBLISHED = ('local-dir:', 'hf-hub:')


@dataclass
class Source:
    """One model to analyse and where it came from (`kind`: 'run folder (timm-st train)', 'run folder
    (train.py)', 'checkpoint', 'hub' or 'pretrained')."""
    spec: str
    kind: str
    group: str
    label: str = ''
    model: Optional[nn.Module] = None
    run: Optional[RunFolder] = None
    checkpoint: Optional[str] = None
    model_name: str = ''
    data_config: Dict[str, Any] = field(default_factory=dict)
    input_img_mode: Optional[str] = None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _kind(spec: str, pretrained: bool) -> str:
    path = Path(spec)
    if path.is_dir():
        return 'run'
    if path.is_file():
        return 'checkpoint'
    if spec.startswith(_PUBLISHED):
        return 'hub'
    if os.sep in spec or spec.endswith(_CHECKPOINT_SUFFIXES):
        raise RunError(f'SOURCE {spec!r} does not exist; give an existing run folder or checkpoint file')
    if not pretrained:
        raise RunError(f'SOURCE {spec!r} is not a folder or file; to analyse the timm model {spec!r} with its '
                       f'pretrained weights add --pretrained (a randomly initialised model has nothing to measure)')
    return 'pretrained'


def collect_sources(specs: Sequence[str], groups: Sequence[Sequence[str]], pretrained: bool) -> List[Source]:
    """The SOURCES in order (ungrouped first, then each `[NAME, SOURCE...]` group), run folders read.

    A source outside any group is a group of its own; labels are the folder or file name (the full spec
    where two would be alike)."""
    entries: List[Tuple[str, Optional[str]]] = [(spec, None) for spec in specs]
    for group in groups:
        if len(group) < 2:
            raise RunError(f'--group {group[0]!r} names no SOURCE; write --group NAME SOURCE [SOURCE ...]')
        entries += [(spec, group[0]) for spec in group[1:]]
    if not entries:
        raise RunError('no SOURCE given; name at least one run folder, checkpoint (with --model) or model')
    sources = []
    for spec, group in entries:
        kind = _kind(spec, pretrained)
        name = Path(spec).name if kind in ('run', 'checkpoint') else spec
        sources.append(Source(spec=spec, kind=kind, group=group or name, label=name))
    labels = [s.label for s in sources]
    for s in sources:  # a name used twice: label with the full path instead
        if labels.count(s.label) > 1:
            s.label = s.spec
    if len({s.label for s in sources}) != len(sources):
        raise RunError('the same SOURCE is given twice; name each once')
    for s in sources:
        if s.kind == 'run':
            s.run = read_run(s.spec)
            s.kind = f'run folder ({s.run.written_by})'
    return sources


def first_run_args(sources: Sequence[Source]) -> Mapping[str, Any]:
    """The arguments of the first run folder among the sources ({} without one): the analysis's defaults."""
    return next((s.run.args for s in sources if s.run is not None), {})


def _build(source: Source, model_name: Optional[str], checkpoint: str, ema: bool,
           num_classes: Optional[int]) -> nn.Module:
    if source.run is not None:
        source.model_name = source.run.args.get('model') or ''
        try:
            source.checkpoint = str(source.run.checkpoint_path(checkpoint))
            return build_model(source.run.args, state_dict=source.run.load_state_dict(checkpoint, ema))
        except RunError as e:
            raise RunError(f'{source.label}: {e}') from None
    if source.kind == 'checkpoint':
        if not model_name:
            raise RunError(f'SOURCE {source.spec!r} is a checkpoint file; name its architecture with --model NAME')
        source.checkpoint, source.model_name = source.spec, model_name
        return build_model({'model': model_name}, num_classes=num_classes, state_dict=load_weights(source.spec, ema))
    import timm  # a published model: timm resolves local-dir:, hf-hub: and pretrained tags itself
    source.model_name = source.spec
    try:
        return timm.create_model(source.spec, pretrained=True)
    except Exception as e:  # timm / the hub: unknown model, missing files, no pretrained weights, no network
        raise RunError(f'cannot load the model {source.spec!r} ({first_line(e)[:300]}); check the name, path or '
                       f'hub id') from None


def load_source(source: Source, *, model_name: Optional[str] = None, checkpoint: str = 'best', ema: bool = False,
                num_classes: Optional[int] = None) -> None:
    """Build `source.model` (eval mode) with its weights (`checkpoint` 'best'/'last' of a run folder; `ema`),
    and resolve its data config and image mode by the one preprocessing rule (module docstring).

    `model_name` is the architecture of a checkpoint file, built with `num_classes` outputs."""
    source.model = _build(source, model_name, checkpoint, ema, num_classes).eval()
    run_args = dict(source.run.args) if source.run is not None else {}
    source.data_config = data_config(run_args, source.model, use_test_size=source.run is None)
    source.input_img_mode = image_mode(run_args.get('input_img_mode'), source.data_config)
