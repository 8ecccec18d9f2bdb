"""Publishing a run: one checkpoint of a run folder as an ordinary timm model, in a folder or on the hub.

Stimulative training adds no parameters: the published weights are the plain timm state dict of the
architecture. timm's `save_for_hf` writes `model.safetensors` and `config.json` (architecture, class names,
the run's evaluation preprocessing, nothing of the default pretrained config that describes someone
else's weights), so `timm.create_model('hf-hub:org/name', pretrained=True)` loads it without timm-st
(`*_cifar` models need `import timm_st`). Next to them go the model card (`card.model_card`) and
`recipe.yaml` (the run's arguments without `options.LOCAL_KEYS`, runnable with `timm-st train -c`).
`export_checkpoint` renames a finished temporary folder into place (complete or not at all); `publish`
pushes the same files with `huggingface_hub`. Bad input is a `RunError` (exit 2), a hub failure exit 1.
"""
import os
import shutil
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Dict, Optional, Union

import torch
import yaml
from timm.models import save_for_hf

from .. import __version__
from .build import build_model
from .card import model_card
from .data import data_config as resolve_data_config
from .errors import RunError
from .folder import TIMM_ST_TRAIN, read_run
from .options import LOCAL_KEYS, option_names
from .validation import check_output_folder

__all__ = ['PublishedRun', 'export_checkpoint', 'publish', 'published_recipe']

PathLike = Union[str, Path]
# pretrained_cfg fields inherited from the architecture's default (e.g. resnet18.a1_in1k) that describe someone
# else's weights, or their evaluation (timm's validate.py resolves the test size first)
_FOREIGN_CFG_KEYS = ('tag', 'origin_url', 'paper_ids', 'paper_name', 'notes', 'description', 'hf_hub_id',
                     'hf_hub_filename', 'url', 'file', 'source', 'license', 'test_input_size', 'test_crop_pct')


class PublishedRun:
    """A run folder (`folder.RunFolder`) with the checkpoint chosen for publishing: its weights and epoch, and the
    accuracy the run recorded for it. A `timm-st train` run must have finished (results.json)."""

    def __init__(self, path: PathLike, checkpoint: str = 'best', ema: bool = False):
        self.folder = read_run(path)
        if self.folder.written_by == TIMM_ST_TRAIN and self.folder.results is None:
            raise RunError(f'no results file {str(self.folder.path / "results.json")!r}: `timm-st train` writes '
                           f'results.json when the run finishes; finish (or resume) the run before publishing it')
        self.checkpoint_name, self.ema = checkpoint, ema
        self.checkpoint_path = self.folder.checkpoint_path(checkpoint)
        self.epoch = self.folder.read_checkpoint(checkpoint).get('epoch')
        self.state_dict = self.folder.load_state_dict(checkpoint, ema)
        self.args = self.folder.args
        self.results: Dict[str, Any] = self.folder.results or {}  # train.py runs write none

    @property
    def model_name(self) -> str:
        return self.args.get('model') or self.results['model']

    @property
    def num_classes(self) -> int:
        return self.args.get('num_classes') or self.results.get('num_classes')

    @property
    def stimulative(self) -> Optional[Dict[str, Any]]:
        section = self.args.get('stimulative', self.results.get('stimulative'))
        return section if isinstance(section, dict) else None

    @property
    def world_size(self) -> int:
        return self.results.get('world_size') or self.args.get('world_size') or 1

    @property
    def is_last(self) -> bool:
        """Whether the checkpoint is of the run's last epoch."""
        epochs = self.folder.column('epoch')
        last = int(epochs[-1]) if epochs else (self.results['epochs'] - 1 if isinstance(self.results.get('epochs'), int)
                                               else None)
        return self.epoch is not None and self.epoch == last

    def metrics_at_checkpoint(self, ema: bool) -> Dict[str, float]:
        """Full-network top1/top5/loss of the chosen checkpoint's epoch (plain or EMA weights); {} if not recorded."""
        epochs = self.folder.column('epoch') or []
        if self.epoch is not None and self.epoch in epochs:
            row = epochs.index(self.epoch)
            columns = {metric: self.folder.eval_column(metric, ema) for metric in ('top1', 'top5', 'loss')}
            return {k: v[row] for k, v in columns.items() if v is not None and v[row] is not None}
        full = self.results.get('full') or {}
        if self.is_last or not epochs:
            prefix = 'ema_' if ema else ''
            return {k: full[prefix + k] for k in ('top1', 'top5', 'loss') if prefix + k in full}
        return {}

    def build_model(self) -> torch.nn.Module:
        """The architecture as the run built it, with the chosen weights, in eval mode."""
        try:
            return build_model(self.args, num_classes=self.num_classes, state_dict=self.state_dict).eval()
        except RunError as e:
            raise RunError(f'{e} (checkpoint {str(self.checkpoint_path)!r})') from None

    def data_config(self, model: torch.nn.Module) -> Dict[str, Any]:
        """The run's evaluation preprocessing (as train.py resolved it; size and crop as results.json records)."""
        config = resolve_data_config(self.args, model)
        if self.results.get('eval_input_size'):
            config['input_size'] = tuple(self.results['eval_input_size'])
        if self.results.get('eval_crop_pct') is not None:
            config['crop_pct'] = self.results['eval_crop_pct']
        return config


def published_recipe(run_args: Dict[str, Any]) -> Dict[str, Any]:
    """A run's resolved arguments as a recipe for `timm-st train -c`: the option table's keys and the stimulative
    section, without machine-local keys (`LOCAL_KEYS`) and empty checkpoint / class-map entries."""
    names = set(option_names()) | {'stimulative'}
    return {k: v for k, v in run_args.items()
            if k in names and k not in LOCAL_KEYS and not (k in ('initial_checkpoint', 'class_map') and not v)}


def _recipe_yaml(run: PublishedRun) -> str:
    a, world = run.args, run.world_size
    header = ('# timm-st recipe of the run that produced these weights: its resolved arguments (args.yaml) without\n'
              '# machine-local keys (data_dir, output, experiment, device, resume, logging).\n'
              '# Run: timm-st train -c recipe.yaml --data-dir /path/to/data\n')
    if a.get('lr') is not None and a.get('batch_size'):
        global_batch = a['batch_size'] * world * (a.get('grad_accum_steps') or 1)
        header += (f'# lr {a["lr"]:g} was resolved for a global batch of {global_batch} '
                   f'({world} device(s)); remove it to rescale from lr_base on other hardware.\n')
    return header + yaml.safe_dump(published_recipe(a), default_flow_style=None, sort_keys=False)


def _write_export(run: PublishedRun, folder: Path, repo_id: Optional[str], model_name: Optional[str], license: str,
                  dataset_id: Optional[str]) -> None:
    model = run.build_model()
    data_config = run.data_config(model)
    class_names = run.results.get('class_names')
    model_config = {}
    if isinstance(class_names, list) and len(class_names) == model.num_classes:
        model_config['label_names'] = class_names
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _FOREIGN_CFG_KEYS}
    model.pretrained_cfg['license'] = license
    model.pretrained_cfg.update(data_config)  # save_for_hf writes pretrained_cfg (its data_config arg is timm>=1.0.31)
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True)
    recipe_text = _recipe_yaml(run)
    (folder / 'recipe.yaml').write_text(recipe_text, encoding='utf-8')
    card = model_card(run, model, data_config, recipe_text, repo_id=repo_id, model_name=model_name, license=license,
                      dataset_id=dataset_id)
    (folder / 'README.md').write_text(card, encoding='utf-8')
    mask = os.umask(0o022)
    os.umask(mask)
    for path in folder.iterdir():  # safetensors writes 0600; an export is meant to be shared
        os.chmod(path, 0o666 & ~mask)


def _replace(tmp: Path, local_dir: Path) -> None:
    """Rename the finished `tmp` into `local_dir`; an existing folder is swapped out, and back on failure."""
    if not local_dir.exists():
        os.rename(tmp, local_dir)
        return
    old = local_dir.parent / f'.{local_dir.name}.old-{uuid.uuid4().hex[:8]}'
    os.rename(local_dir, old)
    try:
        os.rename(tmp, local_dir)
    except BaseException:
        os.rename(old, local_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(output_dir: PathLike, local_dir: PathLike, ema: bool = False, checkpoint: str = 'best',
                      repo_id: Optional[str] = None, overwrite: bool = False, license: str = 'apache-2.0',
                      dataset_id: Optional[str] = None, model_name: Optional[str] = None) -> Path:
    """Write what `publish` would push (model.safetensors, config.json, README.md, recipe.yaml) into `local_dir`.

    `checkpoint`: 'best' (model_best.pth.tar), 'last' (last.pth.tar) or a checkpoint file name in the run's
    folder. `repo_id` only names the model in the card. The folder appears complete or not at all; an existing
    non-empty folder is replaced only with `overwrite`.
    """
    if repo_id is not None:
        _check_repo_id(repo_id)
    local_dir = Path(local_dir).absolute()
    run = PublishedRun(output_dir, checkpoint=checkpoint, ema=ema)
    check_output_folder(str(local_dir), '--local-dir')
    if local_dir.resolve() in (run.folder.path.resolve(), *run.folder.path.resolve().parents):
        raise RunError(f'--local-dir {str(local_dir)!r} would replace the training output folder; choose another '
                       f'folder')
    if local_dir.is_dir() and any(local_dir.iterdir()) and not overwrite:
        raise RunError(f'--local-dir {str(local_dir)!r} exists and is not empty; pass --overwrite to replace it, or '
                       f'choose another folder')
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_dir.parent / f'.{local_dir.name}.tmp-{uuid.uuid4().hex[:8]}'  # same file system: renamed into place
    tmp.mkdir()
    try:
        _write_export(run, tmp, repo_id, model_name, license, dataset_id)
        _replace(tmp, local_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local_dir


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise RunError(f'--repo-id {repo_id!r} is not a valid repository id ({e})') from None
    if repo_id.count('/') != 1:
        raise RunError(f'--repo-id {repo_id!r}: give the owner too, as ORG_OR_USER/NAME')


def _hub_error(action: str, e: Exception) -> RunError:
    first = (str(e).strip().splitlines() or [''])[0][:300]
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    hint = ('; check that your token is valid and has write access to that namespace' if status in (401, 403) else
            '; check your network connection (nothing was published)' if status is None else '')
    return RunError(f'could not {action} on the Hugging Face hub ({type(e).__name__}: {first}){hint}',
                    exit_code=1)  # the hub failed, not the input


def publish(output_dir: PathLike, repo_id: str, ema: bool = False, checkpoint: str = 'best',
            private: bool = False, overwrite: bool = False, revision: Optional[str] = None,
            commit_message: Optional[str] = None, license: str = 'apache-2.0', dataset_id: Optional[str] = None,
            model_name: Optional[str] = None, token: Optional[str] = None) -> str:
    """Push a run's checkpoint to the hub as `repo_id` (what `export_checkpoint` writes); returns the repo URL.

    Refuses an existing repository unless `overwrite`. The token comes from `token`, else the usual login
    (`hf auth login`) or `HF_TOKEN`.
    """
    import huggingface_hub
    _check_repo_id(repo_id)
    token = token or huggingface_hub.get_token()
    if not token:
        raise RunError('no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) first; or write the '
                       'export locally with --local-dir')
    run = PublishedRun(output_dir, checkpoint=checkpoint, ema=ema)
    api = huggingface_hub.HfApi(token=token, library_name='timm-st', library_version=__version__)
    try:
        exists = api.repo_exists(repo_id, repo_type='model')
    except Exception as e:
        raise _hub_error(f'check whether {repo_id!r} exists', e) from None
    if exists and not overwrite:
        raise RunError(f'repository {repo_id!r} already exists on the hub; pass --overwrite to upload into it (its '
                       f'weights are replaced, other files kept), or choose another --repo-id')
    weights = 'EMA' if run.ema else 'plain'
    commit_message = commit_message or (f'Add {run.model_name} weights ({weights}, {run.checkpoint_name} checkpoint) '
                                        f'from timm-st')
    with TemporaryDirectory(prefix='timm-st-publish-') as tmp:
        _write_export(run, Path(tmp), repo_id, model_name, license, dataset_id)
        try:  # stale weights of an existing repository are deleted
            url = api.create_repo(repo_id, private=private, exist_ok=overwrite, repo_type='model')
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type='model')
            api.upload_folder(repo_id=repo_id, folder_path=Path(tmp), repo_type='model', revision=revision,
                              commit_message=commit_message,
                              delete_patterns=['*.safetensors', '*.bin', '*.pth', '*.pt'] if exists else None)
        except Exception as e:
            raise _hub_error(f'upload to {repo_id!r}', e) from None
    return str(getattr(url, 'url', None) or f'https://huggingface.co/{repo_id}')
