"""Run folders: the format of what a training run leaves on disk, and the policy of using one.

A run folder (OUTPUT/EXPERIMENT) holds args.yaml (the resolved arguments), summary.csv (one row per epoch, one
header, validation cells empty on epochs without validation), the checkpoints of timm's CheckpointSaver (last,
model_best, checkpoint-N, milestone-N, recovery-E-S .pth.tar, with the task state) and, for a finished run of
timm-st train, results.json. `read_run` reads one written by `timm-st train` or by timm's train.py (what the
latter lacks is reported as absent, not guessed); the writers are used by the runner.

The policy, shared by the runner and the hook: a folder holding a run is used only to continue it in place (a
checkpoint inside it, `folder_mode`) or with an explicit overwrite; a run continued in place first rewinds what the
epochs being redone wrote (`rewind`) and restores the saver's history (`restore_saver`); `resume_command` is the
command line that continues it.
"""
import argparse
import csv
import json
import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from .checkpoints import load_weights, read_checkpoint
from .errors import RunError
from .resumption import link_replace, newest_checkpoint

__all__ = ['RunFolder', 'read_run', 'holds_run', 'run_folder_path', 'resumes_in_place', 'CHECKPOINT_FILES',
           'RUN_FILES', 'WRITTEN_BY_KEY', 'TIMM_ST_TRAIN', 'TRAIN_PY', 'write_args', 'write_summary_row',
           'truncate_summary', 'write_results', 'clear_run', 'auto_resume_path', 'folder_mode', 'restore_saver',
           'rewind', 'resume_command', 'checkpoint_text']

PathLike = Union[str, Path]

CHECKPOINT_FILES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
# files (and checkpoint patterns) that make a folder a run folder; what `clear_run` removes
RUN_FILES = ('args.yaml', 'summary.csv', 'results.json', 'last.pth.tar', 'model_best.pth.tar')
RUN_PATTERNS = ('checkpoint-*.pth.tar', 'milestone-*.pth.tar', 'recovery-*.pth.tar', 'recovery_tmp.pth.tar',
                'tmp.pth.tar', '*.pth.tar.tmp')
# key of args.yaml by which timm-st train marks its own runs (train.py's args.yaml has no such key)
WRITTEN_BY_KEY = 'written_by'
TIMM_ST_TRAIN = 'timm-st train'
TRAIN_PY = 'train.py'


# ---------------------------------------------------------------------------------------------
# reading

def holds_run(path: PathLike) -> bool:
    """Whether `path` already holds (part of) a training run: any run file or checkpoint in it."""
    path = Path(path)
    return path.is_dir() and (any((path / name).exists() for name in RUN_FILES) or any(
        next(path.glob(pattern), None) is not None for pattern in RUN_PATTERNS))


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


def _summary_lines(path: Path) -> Tuple[List[str], List[List[str]]]:
    """summary.csv's header and rows, without the repeated headers an older resume appended; empty when absent."""
    if not path.is_file():
        return [], []
    with open(path, newline='') as f:
        lines = list(csv.reader(f))
    header = lines[0] if lines else []
    return header, [line for line in lines[1:] if line != header]


def _read_summary(path: Path) -> List[Dict[str, Optional[float]]]:
    header, rows = _summary_lines(path)
    if header and 'epoch' not in header:
        raise RunError(f'{str(path)!r} has no header line with an "epoch" column (written by an old timm-st '
                       f'train that dropped it?); add the header line or remove the file')
    return [{key: _number(row[i]) if i < len(row) else None for i, key in enumerate(header)} for row in rows]


class RunFolder:
    """A read-only view of a run folder (see the module docstring for its files)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunError(f'run folder {str(self.path)!r} does not exist; pass the output folder of a training '
                                 f'run (the one holding args.yaml, summary.csv and the checkpoints)')
        if not holds_run(self.path):
            raise RunError(f'{str(self.path)!r} holds no training run (no args.yaml, summary.csv or '
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
                raise RunError(f'{str(path)!r} is not valid YAML ({str(e).splitlines()[0]}); it is corrupt')
            if isinstance(args, dict):
                return args
            raise RunError(f'{str(path)!r} is not a mapping of training arguments; it is corrupt')
        for name in ('last.pth.tar', 'model_best.pth.tar'):  # args.yaml lost: the saver keeps args in checkpoints
            if (self.path / name).is_file():
                saved = read_checkpoint(self.path / name).get('args')
                if isinstance(saved, argparse.Namespace):
                    return vars(saved)
        raise RunError(f'no training arguments: {str(path)!r} is missing and no checkpoint holds them; the '
                             f'model of this run cannot be rebuilt')

    def _read_results(self) -> Optional[Dict[str, Any]]:
        path = self.path / 'results.json'
        if not path.is_file():
            return None
        try:
            results = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f'results file {str(path)!r} is not valid JSON ({e}); it is corrupt') from None
        if not isinstance(results, dict) or 'model' not in results:
            raise RunError(f'results file {str(path)!r} is not a timm-st results.json (no "model" entry)')
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
        raise RunError(f'no checkpoint {str(path)!r} ({which}); {hint}')

    def read_checkpoint(self, which: str = 'best') -> Dict[str, Any]:
        path = self.checkpoint_path(which)
        checkpoint = read_checkpoint(path)
        if not isinstance(checkpoint.get('state_dict'), dict):
            raise RunError(f'checkpoint {str(path)!r} holds no model weights ("state_dict"); it is not a '
                                 f'training checkpoint of timm')
        return checkpoint

    def load_state_dict(self, which: str = 'best', ema: bool = False) -> Dict[str, torch.Tensor]:
        """Cleaned weights (no DDP/compile prefixes) of a checkpoint; refuses missing EMA weights and NaN/inf."""
        return load_weights(self.checkpoint_path(which), ema, self.read_checkpoint(which) if ema else None)

    def build_model(self, which: str = 'best', ema: bool = False) -> torch.nn.Module:
        """The run's architecture with a checkpoint's weights, in eval mode."""
        from .build import build_model
        return build_model(self.args, state_dict=self.load_state_dict(which, ema)).eval()


def read_run(path: PathLike) -> RunFolder:
    """Read a run folder written by `timm-st train` or by timm's train.py."""
    return RunFolder(path)


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
    values = {**vars(args), WRITTEN_BY_KEY: TIMM_ST_TRAIN}
    _atomic_write(Path(folder) / 'args.yaml', yaml.safe_dump(values, default_flow_style=False))


def _cell(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, float) and math.isnan(value):
        return 'nan'
    return str(value)


def _summary_before(path: Path, epoch: int):
    """(header, rows) of summary.csv without the rows of `epoch` and later (or of no epoch); none without a header."""
    header, lines = _summary_lines(path)
    if 'epoch' not in header:
        return [], []
    rows = []
    for line in lines:
        row = dict(zip(header, line))
        try:
            if int(float(row.get('epoch', ''))) < epoch:
                rows.append(row)
        except ValueError:  # a row without an epoch: dropped
            pass
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
    """Remove a run's files (RUN_FILES and checkpoints) from `folder`, for an explicit overwrite; the names removed."""
    folder = Path(folder)
    names = [n for n in RUN_FILES if (folder / n).exists()]
    for pattern in RUN_PATTERNS:
        names += sorted(p.name for p in folder.glob(pattern))
    for name in names:
        (folder / name).unlink()
    return names


# ---------------------------------------------------------------------------------------------
# policy: fresh, continued in place, or overwritten

def auto_resume_path(output: Optional[str], experiment: Optional[str]) -> str:
    """`--resume auto`: the run folder's newest checkpoint (last.pth.tar, or a recovery checkpoint further into
    training: `resumption.newest_checkpoint`), or '' (a fresh run) when it holds none yet."""
    folder = run_folder_path(output, experiment)
    if folder is None:
        raise RunError('--resume auto continues OUTPUT/EXPERIMENT in place: give the run a name with --experiment NAME')
    return newest_checkpoint(folder)


def folder_mode(folder: Path, resume: Optional[str], overwrite: bool = False, resume_auto: bool = False,
                runner: str = TIMM_ST_TRAIN) -> str:
    """How a run may use `folder`: 'fresh', 'resume' (continue in place) or 'overwrite'; refuses the rest.

    Runs are never overwritten by accident: a folder that holds a run is used only to continue it (a checkpoint
    inside it) or with the explicit `overwrite` option (timm-st train only; timm's train.py has none).
    """
    if not holds_run(folder):
        return 'fresh'
    inside = resumes_in_place(folder, resume)
    if inside and overwrite:
        raise RunError(f'--overwrite would delete {resume!r}, the checkpoint this run resumes from; drop --overwrite '
                       f'to continue the run in place, or resume into another --experiment')
    if inside:
        return 'resume'
    if overwrite:
        return 'overwrite'
    if resume_auto and not (folder / 'summary.csv').exists() and not any(folder.glob('*.pth.tar')):
        return 'fresh'  # a run stopped before its first checkpoint: nothing to resume, start it again
    last = folder / 'last.pth.tar'
    if runner != TIMM_ST_TRAIN:
        raise RunError(f'output folder {str(folder)!r} already holds a run, and train.py would overwrite its '
                       f'checkpoints and args.yaml; continue it with --resume {last}, choose another --experiment, '
                       f'or delete the folder')
    found = sorted(n for n in os.listdir(folder) if n in RUN_FILES or n.endswith('.pth.tar'))
    how = f'continue it with --resume {last} (or --resume auto), ' if last.is_file() else ''
    raise RunError(f'run folder {str(folder)!r} already holds a run ({", ".join(found[:6])}); {how}pass --overwrite '
                   f'to replace it, or choose another --experiment')


def restore_saver(saver, folder: Path, resume_path: str, start_epoch: int) -> None:
    """Continue the checkpoint bookkeeping of a run resumed in place (ranked checkpoint-N history, best metric),
    so checkpoint_hist and model_best hold over the whole run."""
    if hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.31 keeps it in each checkpoint
        saver.load_state_dict_from_checkpoint(resume_path)
        return
    # older timm: rebuild it from the kept checkpoints of earlier epochs (each records its epoch and metric)
    kept = []
    for path in folder.glob('checkpoint-*.pth.tar'):
        checkpoint = read_checkpoint(path)
        if checkpoint.get('epoch', start_epoch) < start_epoch and checkpoint.get('metric') is not None:
            kept.append((str(path), checkpoint['metric'], checkpoint['epoch']))
    kept.sort(key=lambda c: c[1], reverse=not saver.decreasing)
    saver.checkpoint_files = [(path, metric) for path, metric, _ in kept]
    if kept:
        saver.best_metric, saver.best_epoch = kept[0][1], kept[0][2]


def _numbered(folder: Path, prefix: str):
    """(N, path) of the files PREFIX-N.pth.tar in `folder`."""
    for path in folder.glob(f'{prefix}-*.pth.tar'):
        number = path.name[len(prefix) + 1:-len('.pth.tar')]
        if number.isdigit():
            yield int(number), path


def rewind(folder: Path, start_epoch: int, best_epoch: Optional[int], resume_path: str = '') -> None:
    """Before continuing a run in place from epoch `start_epoch`: remove what the epochs being redone wrote
    (their summary rows and checkpoints, a best checkpoint from them, and results.json: the run is no longer
    finished) and the recovery checkpoints other than `resume_path` (superseded, or of epochs being redone), so
    that an interrupted continuation leaves a consistent folder."""
    truncate_summary(folder, start_epoch)
    stale = [path for epoch, path in _numbered(folder, 'checkpoint') if epoch >= start_epoch]
    stale += [path for done, path in _numbered(folder, 'milestone') if done > start_epoch]
    stale += [path for path in folder.glob('recovery-*.pth.tar')
              if not resume_path or path.resolve() != Path(resume_path).resolve()]
    for path in stale:
        path.unlink()
    best = folder / 'model_best.pth.tar'
    if best.is_file() and read_checkpoint(best).get('epoch', -1) >= start_epoch:
        kept = folder / f'checkpoint-{best_epoch}.pth.tar' if best_epoch is not None else None
        if kept is not None and kept.is_file():
            link_replace(kept, best)
        else:
            best.unlink()
    (folder / 'results.json').unlink(missing_ok=True)


def resume_command(folder: Path, argv: Sequence[str]) -> str:
    """The `timm-st train` command line that continues this run in place: the given one without the options that
    name the run's files (options table scope 'run'), which it sets itself."""
    from .options import RUN_SCOPED, takes_value
    drop = {'--' + name.replace('_', '-'): name for name in RUN_SCOPED}
    kept, skip = [], False
    for a in argv:  # skip: `a` is the value of a dropped option
        if not skip and a.split('=')[0] not in drop:
            kept.append(a)
        skip = not skip and a in drop and takes_value(drop[a])
    if kept and kept[0] == 'train':
        kept = kept[1:]
    return shlex.join(['timm-st', 'train', *kept, '--output', str(folder.parent), '--experiment', folder.name,
                       '--resume', 'auto'])


def checkpoint_text(folder: Optional[Path], saved_epoch: Optional[int]) -> str:
    """Where the run can be continued from, for the messages of a stopped run."""
    last = folder / 'last.pth.tar' if folder is not None else None
    if last is None or not last.is_file():
        return 'no checkpoint was written yet'
    return f'last checkpoint: {last}' + (f' (end of epoch {saved_epoch})' if saved_epoch is not None else '')
