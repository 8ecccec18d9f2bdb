"""Run folders: the one reader and writer of what a training run leaves on disk.

A run folder holds
  args.yaml            the run's resolved arguments (timm-st train's, or timm train.py's own)
  summary.csv          one row per epoch, one header; validation columns empty on epochs without validation
  last.pth.tar, model_best.pth.tar, checkpoint-N.pth.tar
                       checkpoints as timm's CheckpointSaver writes them (with the task state)
  results.json         final results (timm-st train only, written when the run finishes)
`timm-st train` writes it through the functions here; `publish`, `analyze` and resume read it with
`read_run`. A folder written by timm's train.py (through the hook) is read the same way; what it
lacks (results.json, the sub-network loss column) is reported as absent, not guessed.
"""
import argparse
import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import yaml

__all__ = ['RunFolderError', 'RunFolder', 'read_run', 'holds_run', 'build_model', 'read_checkpoint',
           'CHECKPOINT_FILES', 'RUN_FILES', 'WRITTEN_BY_KEY', 'write_args', 'write_summary_row', 'truncate_summary',
           'write_results', 'clear_run', 'run_folder_path', 'resumes_in_place']

PathLike = Union[str, Path]

CHECKPOINT_FILES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
# files (and checkpoint patterns) that make a folder a run folder; what `clear_run` removes
RUN_FILES = ('args.yaml', 'summary.csv', 'results.json', 'last.pth.tar', 'model_best.pth.tar')
RUN_PATTERNS = ('checkpoint-*.pth.tar', 'milestone-*.pth.tar', 'recovery-*.pth.tar', 'recovery_tmp.pth.tar',
                'tmp.pth.tar')
# key of args.yaml by which timm-st train marks its own runs (train.py's args.yaml has no such key)
WRITTEN_BY_KEY = 'written_by'
TIMM_ST_TRAIN = 'timm-st train'
TRAIN_PY = 'train.py'


class RunFolderError(ValueError):
    """A run folder (or one of its files) that cannot be used; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint dictionary safely (`weights_only`); a ValueError says why it cannot be used."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated, foreign or garbage file
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise RunFolderError(f'checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {first}); '
                             f'it is corrupt or not a PyTorch checkpoint') from None
    if not isinstance(checkpoint, dict):
        raise RunFolderError(f'checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint '
                             f'dictionary')
    return checkpoint


# ---------------------------------------------------------------------------------------------
# reading

def holds_run(path: PathLike) -> bool:
    """Whether `path` already holds (part of) a training run: any run file or checkpoint in it."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any((path / name).exists() for name in RUN_FILES) or any(
        next(path.glob(pattern), None) is not None for pattern in RUN_PATTERNS)


def run_folder_path(output: Optional[str], experiment: Optional[str]) -> Optional[Path]:
    """OUTPUT/EXPERIMENT, as timm's train.py and `timm-st train` name a run folder; None when the experiment is
    not named (the runner then creates a new folder named after the time, model and size)."""
    return Path(output or './output/train') / experiment if experiment else None


def resumes_in_place(folder: PathLike, resume: Optional[str]) -> bool:
    """Whether `resume` is a checkpoint inside `folder`, i.e. the command continues that run there."""
    return bool(resume) and Path(resume).resolve().parent == Path(folder).resolve()


def _number(value: Optional[str]) -> Union[float, str, None]:
    """A summary.csv cell: a number, None when empty, else the text (e.g. eval_split)."""
    if value is None or value.strip() == '':
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _read_summary(path: Path) -> List[Dict[str, Optional[float]]]:
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = rows[0]
    if 'epoch' not in header:
        raise RunFolderError(f'{str(path)!r} has no header line with an "epoch" column (written by an old timm-st '
                             f'train that dropped it?); add the header line or remove the file')
    out = []
    for row in rows[1:]:
        if row == header:  # a second header, appended by an older resume: skip it
            continue
        out.append({key: _number(row[i]) if i < len(row) else None for i, key in enumerate(header)})
    return out


class RunFolder:
    """A read-only view of a run folder (see the module docstring for its files)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunFolderError(f'run folder {str(self.path)!r} does not exist; pass the output folder of a training '
                                 f'run (the one holding args.yaml, summary.csv and the checkpoints)')
        if not holds_run(self.path):
            raise RunFolderError(f'{str(self.path)!r} holds no training run (no args.yaml, summary.csv or '
                                 f'checkpoints); pass the output folder of a run (OUTPUT/EXPERIMENT)')
        self.args: Dict[str, Any] = self._read_args()
        self.summary = _read_summary(self.path / 'summary.csv')
        self.results: Optional[Dict[str, Any]] = self._read_results()
        self.written_by = TIMM_ST_TRAIN if self.args.get(WRITTEN_BY_KEY) == TIMM_ST_TRAIN else TRAIN_PY

    def _read_args(self) -> Dict[str, Any]:
        path = self.path / 'args.yaml'
        if path.is_file():
            try:
                args = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise RunFolderError(f'{str(path)!r} is not valid YAML ({str(e).splitlines()[0]}); it is corrupt')
            if isinstance(args, dict):
                return args
            raise RunFolderError(f'{str(path)!r} is not a mapping of training arguments; it is corrupt')
        for name in ('last.pth.tar', 'model_best.pth.tar'):  # args.yaml lost: the saver keeps args in checkpoints
            if (self.path / name).is_file():
                saved = read_checkpoint(self.path / name).get('args')
                if isinstance(saved, argparse.Namespace):
                    return vars(saved)
        raise RunFolderError(f'no training arguments: {str(path)!r} is missing and no checkpoint holds them; the '
                             f'model of this run cannot be rebuilt')

    def _read_results(self) -> Optional[Dict[str, Any]]:
        path = self.path / 'results.json'
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise RunFolderError(f'results file {str(path)!r} is not valid JSON ({e}); it is corrupt') from None
        if not isinstance(results, dict) or 'model' not in results:
            raise RunFolderError(f'results file {str(path)!r} is not a timm-st results.json (no "model" entry)')
        return results

    # summary.csv
    def column(self, name: str) -> Optional[List[Optional[float]]]:
        """Values of summary.csv column `name`, one per row (None where empty); None when the column is absent."""
        if not self.summary or name not in self.summary[0]:
            return None
        return [row.get(name) for row in self.summary]

    @property
    def ema_validated(self) -> bool:
        """Whether EMA weights were validated each epoch (EMA on, and not kept on the CPU only)."""
        return bool(self.args.get('model_ema')) and not self.args.get('model_ema_force_cpu')

    def eval_column(self, metric: str, ema: bool = False) -> Optional[List[Optional[float]]]:
        """Validation `metric` ('top1', 'top5', 'loss') per epoch of the plain or EMA weights; None if not recorded.

        timm-st train records both (eval_*, eval_ema_*); train.py records only one, under eval_*: the EMA
        weights' metrics when EMA is validated, else the plain ones.
        """
        if self.written_by == TIMM_ST_TRAIN:
            return self.column(f'eval_ema_{metric}' if ema else f'eval_{metric}')
        return self.column(f'eval_{metric}') if ema == self.ema_validated else None

    @property
    def epochs_done(self) -> int:
        """Epochs recorded in summary.csv."""
        return len(self.summary)

    @property
    def finished(self) -> bool:
        return self.results is not None

    # checkpoints
    def checkpoint_path(self, which: str = 'best') -> Path:
        """'best' (model_best.pth.tar), 'last' (last.pth.tar) or a checkpoint file name (or path)."""
        name = CHECKPOINT_FILES.get(which, which)
        path = Path(name) if os.path.isabs(name) else self.path / name
        if path.is_file():
            return path
        found = sorted(p.name for p in self.path.glob('*.pth.tar'))
        hint = (f'checkpoints there: {found}; choose one of them (best, last or a file name)' if found else
                'the folder holds no checkpoint (*.pth.tar); was the run stopped before its first evaluation?')
        raise RunFolderError(f'no checkpoint {str(path)!r} ({which}); {hint}')

    def read_checkpoint(self, which: str = 'best') -> Dict[str, Any]:
        path = self.checkpoint_path(which)
        checkpoint = read_checkpoint(path)
        if not isinstance(checkpoint.get('state_dict'), dict):
            raise RunFolderError(f'checkpoint {str(path)!r} holds no model weights ("state_dict"); it is not a '
                                 f'training checkpoint of timm')
        return checkpoint

    def load_state_dict(self, which: str = 'best', ema: bool = False) -> Dict[str, torch.Tensor]:
        """Cleaned weights (no DDP/compile prefixes) of a checkpoint; refuses missing EMA weights and NaN/inf."""
        return checkpoint_weights(self.read_checkpoint(which), self.checkpoint_path(which), ema)

    def build_model(self, which: str = 'best', ema: bool = False) -> torch.nn.Module:
        """The run's architecture with a checkpoint's weights, in eval mode."""
        return build_model(self.args, state_dict=self.load_state_dict(which, ema)).eval()


def checkpoint_weights(checkpoint: Mapping[str, Any], path: PathLike, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The plain or EMA weights of a loaded checkpoint, cleaned, checked finite."""
    from timm.models import clean_state_dict
    key = 'state_dict_ema' if ema else 'state_dict'
    state_dict = checkpoint.get(key)
    if not isinstance(state_dict, dict) or not state_dict:
        if ema:
            raise RunFolderError(f'checkpoint {str(path)!r} holds no EMA weights (train with --model-ema / '
                                 f'`model_ema: true` to keep them); use the plain weights')
        raise RunFolderError(f'checkpoint {str(path)!r} holds no model weights')
    state_dict = clean_state_dict(state_dict)
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunFolderError(f'checkpoint {str(path)!r}: weight {name!r} holds NaN or inf (the run diverged?); '
                                 f'use an earlier checkpoint')
    return state_dict


def read_run(path: PathLike) -> RunFolder:
    """Read a run folder written by `timm-st train` or by timm's train.py."""
    return RunFolder(path)


# ---------------------------------------------------------------------------------------------
# the model of a run

def _in_chans(args: Mapping[str, Any]) -> Optional[int]:
    """As timm's train.py: --in-chans, else the channels of --input-size, else the model's default."""
    if args.get('in_chans') is not None:
        return args['in_chans']
    if args.get('input_size'):
        return args['input_size'][0]
    return None


def build_model(args: Union[Mapping[str, Any], argparse.Namespace], *, num_classes: Optional[int] = None,
                pretrained: bool = False, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                checkpoint_path: str = '') -> torch.nn.Module:
    """The architecture exactly as the run built it: `timm.create_model` with the run's model arguments.

    Used by `timm-st train` (with `pretrained` / `checkpoint_path` from its options) and by everything that
    rebuilds a run's model (publish, analyze); `state_dict` is then loaded strictly.
    """
    import timm
    a = vars(args) if isinstance(args, argparse.Namespace) else args
    name = a.get('model')
    if not name or not timm.is_model(name):
        raise RunFolderError(f'model {name!r} of this run is not a timm model in this environment (models of '
                             f'timm-st need `import timm_st`; others a newer timm)')
    num_classes = num_classes if num_classes is not None else a.get('num_classes')
    try:
        model = timm.create_model(
            name, pretrained=pretrained, in_chans=_in_chans(a), num_classes=num_classes,
            drop_rate=a.get('drop') or 0.0, drop_path_rate=a.get('drop_path'), drop_block_rate=a.get('drop_block'),
            global_pool=a.get('gp'), bn_momentum=a.get('bn_momentum'), bn_eps=a.get('bn_eps'),
            checkpoint_path=checkpoint_path or None, **(a.get('model_kwargs') or {}))
    except Exception as e:
        raise RunFolderError(f'cannot build {name!r} with the run\'s arguments ({type(e).__name__}: '
                             f'{str(e).splitlines()[0] if str(e) else e}); check model_kwargs / num_classes') from None
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise RunFolderError(f'the weights do not fit {name!r} built with the run\'s arguments: '
                                 f'{str(e).splitlines()[0][:300]}...; they belong to another architecture or '
                                 f'class count') from None
    return model


# ---------------------------------------------------------------------------------------------
# writing (timm-st train)

def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', newline='') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_args(folder: PathLike, args: argparse.Namespace) -> None:
    """args.yaml: the resolved arguments, marked as written by timm-st train."""
    values = dict(vars(args))
    values[WRITTEN_BY_KEY] = TIMM_ST_TRAIN
    _atomic_write(Path(folder) / 'args.yaml', yaml.safe_dump(values, default_flow_style=False))


def _cell(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, float) and math.isnan(value):
        return 'nan'
    return str(value)


def _summary_before(path: Path, epoch: int):
    """(header, rows) of summary.csv without the rows of `epoch` and later (and without repeated headers)."""
    header: List[str] = []
    rows: List[Dict[str, str]] = []
    if path.is_file():
        with open(path, newline='') as f:
            lines = list(csv.reader(f))
        if lines and 'epoch' in lines[0]:
            header = list(lines[0])
            for line in lines[1:]:
                if line == header:
                    continue
                record = dict(zip(header, line))
                try:
                    if int(float(record.get('epoch', ''))) >= epoch:
                        continue
                except ValueError:
                    continue
                rows.append(record)
    return header, rows


def _write_summary(path: Path, header: List[str], rows: List[Dict[str, str]]) -> None:
    with tempfile.SpooledTemporaryFile(mode='w+', newline='') as buffer:
        writer = csv.DictWriter(buffer, fieldnames=header, restval='')
        writer.writeheader()
        writer.writerows(rows)
        buffer.seek(0)
        _atomic_write(path, buffer.read())


def write_summary_row(folder: PathLike, epoch: int, row: Mapping[str, Any]) -> None:
    """Record `epoch` in summary.csv: rows of this and later epochs are replaced (a resumed run rewrites them),
    the header is the union of all columns in order, and cells a row does not have stay empty.

    The file is rewritten atomically, so it always holds exactly one header and strictly increasing epochs.
    """
    path = Path(folder) / 'summary.csv'
    header, rows = _summary_before(path, epoch)
    new = {'epoch': str(epoch), **{k: _cell(v) for k, v in row.items()}}
    header += [key for key in new if key not in header]
    _write_summary(path, header, rows + [new])


def truncate_summary(folder: PathLike, epoch: int) -> None:
    """Drop the rows of `epoch` and later from summary.csv (a run continued from an earlier checkpoint)."""
    path = Path(folder) / 'summary.csv'
    if path.is_file():
        header, rows = _summary_before(path, epoch)
        if header:
            _write_summary(path, header, rows)


def write_results(folder: PathLike, results: Mapping[str, Any]) -> None:
    _atomic_write(Path(folder) / 'results.json', json.dumps(results, indent=2))


def clear_run(folder: PathLike) -> List[str]:
    """Remove a run's files (RUN_FILES and checkpoints) from `folder`, for an explicit overwrite; other files stay.

    Returns the names removed.
    """
    folder = Path(folder)
    names = [n for n in RUN_FILES if (folder / n).exists()]
    for pattern in RUN_PATTERNS:
        names += sorted(p.name for p in folder.glob(pattern))
    for name in names:
        (folder / name).unlink()
    return names
