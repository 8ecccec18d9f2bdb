"""`timm-st publish`: a trained checkpoint as an ordinary timm model on the Hugging Face hub.

    timm-st publish OUTPUT_DIR --repo-id org/name [--ema] [--checkpoint best|last] [--private] [--overwrite]
    timm-st publish OUTPUT_DIR --local-dir ./export       # offline: write exactly what would be pushed

OUTPUT_DIR is a `timm-st train` output folder (args.yaml, results.json, summary.csv and the
checkpoints written by timm's CheckpointSaver). Stimulative training adds no parameters, so the
published weights are the plain timm state dict of the architecture: timm's own `save_for_hf`
writes `model.safetensors` and `config.json` (architecture, num_classes, label names and the
evaluation preprocessing of the run), and the model then loads with
`timm.create_model('hf-hub:org/name', pretrained=True)` without timm-st installed (models
registered by timm-st, `*_cifar`, need `import timm_st` first). Next to them go a model card
(`README.md`: results, ST settings, recipe, cost, citations) and `recipe.yaml` (the run's resolved
recipe, runnable with `timm-st train -c recipe.yaml`).

Everything is written into a temporary folder first: a failure leaves no partial export behind.
"""
import argparse
import math
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import yaml

import timm
from timm.models import save_for_hf
from timm.models._hub import generate_readme

from .. import __version__
from ..method.config import describe_method
from ..runs.build import build_model
from ..runs.checkpoints import load_weights
from ..runs.data import data_config as _resolve_data_config
from ..runs.errors import RunError as PublishError
from ..runs.folder import CHECKPOINT_FILES, TIMM_ST_TRAIN, read_run
from ..runs.options import LOCAL_KEYS as _LOCAL_KEYS

__all__ = ['PublishError', 'export_checkpoint', 'publish', 'main', 'CHECKPOINT_FILES', 'CITATIONS']

# pretrained_cfg fields inherited from the architecture's default (e.g. resnet18.a1_in1k) that would
# describe someone else's weights
_FOREIGN_CFG_KEYS = ('tag', 'origin_url', 'paper_ids', 'paper_name', 'notes', 'description', 'hf_hub_id',
                     'hf_hub_filename', 'url', 'file', 'source', 'license')
_DATASET_IDS = {  # timm dataset name (after the 'torch/' etc. prefix) -> Hugging Face dataset id
    'cifar10': 'cifar10', 'cifar100': 'cifar100', 'imagenet': 'imagenet-1k', 'imagenet2012': 'imagenet-1k',
    'imagenet-1k': 'imagenet-1k', 'imagenet1k': 'imagenet-1k', 'ilsvrc2012': 'imagenet-1k', 'in1k': 'imagenet-1k',
}

CITATIONS = (
    """@article{ye2022stimulative,
  title={Stimulative training of residual networks: A social psychology perspective of loafing},
  author={Ye, Peng and Tang, Shengji and Li, Baopu and Chen, Tao and Ouyang, Wanli},
  journal={Advances in Neural Information Processing Systems},
  volume={35},
  pages={3596--3608},
  year={2022}
}""",
    """@article{ye2023stimulative,
  title={Stimulative training++: Go beyond the performance limits of residual networks},
  author={Ye, Peng and He, Tong and Tang, Shengji and Li, Baopu and Chen, Tao and Bai, Lei and Ouyang, Wanli},
  journal={arXiv preprint arXiv:2305.02507},
  year={2023}
}""",
    """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
)


# ---------------------------------------------------------------------------------------------
# the run folder and the checkpoint chosen for publishing

class TrainingRun:
    """A run folder (read by `run_folder.read_run`) with one checkpoint chosen for publishing."""

    def __init__(self, output_dir: Union[str, Path], checkpoint: str = 'best', ema: bool = False):
        self.folder = read_run(output_dir)
        if self.folder.written_by == TIMM_ST_TRAIN and self.folder.results is None:
            raise PublishError(f'no results file {str(self.folder.path / "results.json")!r}: `timm-st train` '
                               f'writes results.json when the run finishes; finish (or resume) the run before '
                               f'publishing it')
        self.checkpoint_path = self.folder.checkpoint_path(checkpoint)
        self.checkpoint = self.folder.read_checkpoint(checkpoint)
        self.state_dict = load_weights(self.checkpoint_path, ema, self.checkpoint)
        self.output_dir = self.folder.path
        self.checkpoint_name = checkpoint
        self.ema = ema
        self.args = self.folder.args
        self.summary = self.folder.summary
        self.results: Dict[str, Any] = self.folder.results or {}  # train.py runs write none
        self.epoch = self.checkpoint.get('epoch')

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
    def eval_on_train(self) -> bool:
        """Whether the run 'validated' on its training data (explicit `eval_on_train`)."""
        return bool(self.args.get('eval_on_train'))

    @property
    def last_epoch(self) -> Optional[int]:
        epochs = self.folder.column('epoch')
        if epochs:
            return int(epochs[-1])
        epochs = self.results.get('epochs')
        return epochs - 1 if isinstance(epochs, int) else None

    @property
    def is_last(self) -> bool:
        return self.epoch is not None and self.epoch == self.last_epoch

    def metrics_at_checkpoint(self, ema: bool) -> Dict[str, float]:
        """Full-network top1/top5/loss of the chosen checkpoint's epoch (plain or EMA weights); {} if not recorded."""
        epochs = self.folder.column('epoch') or []
        if self.epoch is not None and self.epoch in epochs:
            row = epochs.index(self.epoch)
            out = {}
            for metric in ('top1', 'top5', 'loss'):
                values = self.folder.eval_column(metric, ema)
                if values is not None and values[row] is not None:
                    out[metric] = values[row]
            return out
        full = self.results.get('full') or {}
        if self.is_last or not epochs:
            prefix = 'ema_' if ema else ''
            return {k: full[prefix + k] for k in ('top1', 'top5', 'loss') if prefix + k in full}
        return {}


# ---------------------------------------------------------------------------------------------
# building the export

def _create_model(run: TrainingRun) -> torch.nn.Module:
    """The architecture as the run built it (the shared `build_model`), with the chosen weights."""
    try:
        return build_model(run.args, num_classes=run.num_classes, state_dict=run.state_dict).eval()
    except PublishError as e:
        raise PublishError(f'{e} (checkpoint {str(run.checkpoint_path)!r})') from None

def _data_config(run: TrainingRun, model: torch.nn.Module) -> Dict[str, Any]:
    """The evaluation preprocessing of the run (as train.py resolved it; size and crop as results.json records)."""
    config = _resolve_data_config(run.args, model)
    if run.results.get('eval_input_size'):
        config['input_size'] = tuple(run.results['eval_input_size'])
    if run.results.get('eval_crop_pct') is not None:
        config['crop_pct'] = run.results['eval_crop_pct']
    return config


def _registered_by_timm_st(model_name: str) -> bool:
    try:
        return timm.models.model_entrypoint(model_name).__module__.startswith('timm_st')
    except Exception:
        return False


def _dataset(run: TrainingRun, dataset_id: Optional[str]):
    """(text for the card, Hugging Face dataset id or None)."""
    name = run.args.get('dataset') or ''
    if name == 'digits':
        text, hub = 'digits (scikit-learn 8x8 handwritten digits, the timm-st demo set)', None
    elif '/' in name and name.split('/', 1)[0] in ('torch', 'tfds', 'hfds', 'hfids', 'wds'):
        prefix, base = name.split('/', 1)
        hub = base if prefix in ('hfds', 'hfids') else _DATASET_IDS.get(base.lower())
        text = name
    else:
        base = os.path.basename(os.path.normpath(run.args.get('data_dir') or '')) or 'image folder'
        hub = _DATASET_IDS.get(base.lower())
        text = f'image folder `{base}`' + (f' ({name})' if name else '')
    return text, (dataset_id or hub)


def _recipe(run: TrainingRun) -> Dict[str, Any]:
    """The run's resolved arguments as a recipe for `timm-st train -c` (machine-local keys left out)."""
    from ..runs.options import build_parser
    options = set(vars(build_parser().parse_args([])))
    recipe = {}
    for key, value in run.args.items():
        if key not in options or key in _LOCAL_KEYS:
            continue
        if key in ('initial_checkpoint', 'class_map') and not value:
            continue
        recipe[key] = value
    if run.stimulative is not None:
        recipe['stimulative'] = run.stimulative
    return recipe


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def _mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _yaml_block(data: Any, flow: Optional[bool] = None) -> str:
    return '```yaml\n' + yaml.safe_dump(data, default_flow_style=flow, sort_keys=False).rstrip() + '\n```\n'


def _model_card(run: TrainingRun, model: torch.nn.Module, data_config: Dict[str, Any], repo_id: Optional[str],
                model_name: str, license: str, dataset_text: str, dataset_id: Optional[str],
                recipe_text: str) -> str:
    arch = run.model_name
    needs_timm_st = _registered_by_timm_st(arch)
    tag, method, strategies = describe_method(run.stimulative)
    weights = 'EMA' if run.ema else 'plain (non-EMA)'
    which = {'best': 'best', 'last': 'last'}.get(run.checkpoint_name, run.checkpoint_path.name)
    epochs = run.args.get('epochs') or run.results.get('epochs')
    epoch_text = f'epoch {run.epoch + 1} of {epochs}' if isinstance(run.epoch, int) else 'epoch not recorded'
    eval_size = data_config['input_size']
    train_sizes = run.args.get('train_img_sizes')
    train_text = (' / '.join(f'{s} x {s}' for s in train_sizes) if train_sizes else
                  f'{eval_size[1]} x {eval_size[2]}')
    params = sum(p.numel() for p in model.parameters()) / 1e6
    ref = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME'

    description = (f'A {arch} image classification model trained on {dataset_text} with {method}, using timm-st '
                   f'recipes on timm\'s training pipeline. Stimulative training adds no parameters: these are plain '
                   f'timm weights of `{arch}`.')
    if needs_timm_st:
        description += (f'\n\n**`{arch}` is registered with timm by timm-st**: `import timm_st` before '
                        f'`timm.create_model` (the weights themselves are a plain state dict).')

    details = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'`{arch}`' + (' (registered by timm-st: needs `import timm_st`)' if needs_timm_st else
                                       ' (timm)'),
        'Model Stats': {
            'Params (M)': f'{params:.2f}',
            'Image size': f'train = {train_text}, test = {eval_size[1]} x {eval_size[2]}',
        },
        'Training data': dataset_text,
        'Training method': method + (': ' + '; '.join(strategies) if strategies else ''),
        'Weights': (f'{weights} weights of the {which} checkpoint (`{run.checkpoint_path.name}`, {epoch_text})'),
        'Papers': [
            'Stimulative Training of Residual Networks: A Social Psychology Perspective of Loafing '
            '(NeurIPS 2022)',
            'Stimulative Training++: Go Beyond The Performance Limits of Residual Networks: '
            'https://arxiv.org/abs/2305.02507',
        ],
        'License': license,
    }
    if dataset_id:
        details['Dataset'] = dataset_id
    if run.args.get('pretrained'):
        details['Initialization'] = f'timm\'s pretrained `{arch}` weights (`pretrained: true`)'
    elif run.args.get('initial_checkpoint'):
        details['Initialization'] = 'a local checkpoint (`initial_checkpoint`)'

    prefix = 'import timm_st  # registers ' + arch + ' with timm\n' if needs_timm_st else ''
    usage = (
        '### Image Classification\n```python\n'
        'from PIL import Image\nimport timm\nimport torch\n' + prefix +
        f"\nmodel = timm.create_model('{ref}', pretrained=True).eval()\n"
        "data_config = timm.data.resolve_model_data_config(model)  # the run's evaluation preprocessing\n"
        "transforms = timm.data.create_transform(**data_config, is_training=False)\n\n"
        "img = Image.open('image.png').convert('RGB')\n"
        "with torch.no_grad():\n"
        "    output = model(transforms(img).unsqueeze(0))\n"
        f"top_probs, top_idx = torch.topk(output.softmax(dim=1), k={min(5, run.num_classes)})\n"
        "labels = model.pretrained_cfg.get('label_names')  # class names of the training set, when known\n"
        "```\n")
    if not repo_id:
        usage += "\nFrom a local copy of this folder: `timm.create_model('local-dir:PATH', pretrained=True)`.\n"

    stimulative_tag = ['stimulative-training'] if tag in ('st', 'stpp') else []
    card = {'tags': ['image-classification', 'timm', 'timm-st'] + stimulative_tag,
            'license': license, 'library_name': 'timm', 'description': description, 'details': details,
            'usage': usage}
    text = generate_readme(card, model_name)
    text += _results_section(run, tag, data_config)
    text += _settings_section(run, tag, strategies)
    text += _recipe_section(run, recipe_text)
    text += _cost_section(run)
    text += _reproduce_section(run, repo_id)
    text += '\n## Citation\n'
    for citation in CITATIONS:
        text += f'```bibtex\n{citation}\n```\n'
    return text


def _results_section(run: TrainingRun, tag: str, data_config: Dict[str, Any]) -> str:
    which = 'EMA' if run.ema else 'plain'
    text = '\n## Results\n'
    split = (f'**the training data** (`{run.args.get("train_split", "train")}`, explicit `eval_on_train`: these '
             f'numbers are not held-out accuracy)' if run.eval_on_train else
             f'the validation split (`{run.args.get("val_split", "validation")}`)')
    text += (f'Evaluated by `{run.folder.written_by}` on {split} at '
             f'{data_config["input_size"][-1]} px, crop_pct {data_config["crop_pct"]}; top-1 / top-5 accuracy '
             f'in %.\n\n')
    text += '| Network | Weights | Top-1 | Top-5 |\n|---|---|---|---|\n'
    published = run.metrics_at_checkpoint(run.ema)
    epoch = f'epoch {run.epoch + 1}' if isinstance(run.epoch, int) else 'chosen epoch'
    text += (f'| **Full network (published)** | {which}, {epoch} | **{_fmt(published.get("top1"))}** | '
             f'{_fmt(published.get("top5"))} |\n')
    other = run.metrics_at_checkpoint(not run.ema)
    if other:
        text += (f'| Full network | {"plain" if run.ema else "EMA"}, {epoch} (not published) | '
                 f'{_fmt(other.get("top1"))} | {_fmt(other.get("top5"))} |\n')
    if not published:
        text += ('\nThe accuracy of the published weights was not recorded'
                 + (' (EMA weights were not evaluated during training, e.g. `model_ema_force_cpu`).\n'
                    if run.ema else '.\n'))
    subnets = run.results.get('subnets') or {}
    entries = subnets.get('subnets') or []
    if subnets.get('count') and entries:
        full = run.results.get('full') or {}
        for bn, what in (('running', "the full network's BatchNorm statistics"),
                         ('recalibrate', f'own BatchNorm statistics re-estimated on '
                                         f'{subnets["recalibrate"].get("calib_images")} training images')):
            stats = subnets[bn]
            t5 = _mean_std([s[bn]['top5'] for s in entries])
            text += (f'| Sub-networks: {subnets["count"]} of space `{subnets.get("space")}`, {what}, mean +- std '
                     f'(min / max top-1: {_fmt(stats.get("top1_min"))} / {_fmt(stats.get("top1_max"))}) | plain, '
                     f'final | {_fmt(stats.get("top1_mean"))} +- {_fmt(stats.get("top1_std"))} | '
                     f'{_fmt(t5[0])} +- {_fmt(t5[1])} |\n')
        if run.ema or not run.is_last:
            text += (f'\nSub-networks were evaluated at the end of training on the final plain weights (full '
                     f'network on those: top-1 {_fmt(full.get("top1"))}, top-5 {_fmt(full.get("top5"))}), '
                     f'not on the published weights.\n')
        trained_subnets = tag in ('st', 'stpp')
        text += ('\nA sub-network keeps a prefix of the residual blocks of each stage (the others are skipped); '
                 + ('stimulative training makes these sub-networks strong on their own.\n' if trained_subnets else
                    'this common-training run is a baseline for them.\n'))
        text += '\n<details><summary>Evaluated sub-networks (blocks kept per stage)</summary>\n\n'
        text += ('| Blocks kept | Top-1 (running BN) | Top-5 (running BN) | Top-1 (own BN) | Top-5 (own BN) |\n'
                 '|---|---|---|---|---|\n')
        for s in entries:
            text += (f'| {s["depths"]} | {_fmt(s["running"]["top1"])} | {_fmt(s["running"]["top5"])} | '
                     f'{_fmt(s["recalibrate"]["top1"])} | {_fmt(s["recalibrate"]["top5"])} |\n')
        text += '\n</details>\n'
    elif subnets.get('skipped'):
        text += f'\nSub-networks were not evaluated: {subnets["skipped"]}.\n'
    best_epoch = run.results.get('best_epoch')
    if best_epoch is not None:
        weights = 'EMA weights' if run.folder.ema_validated else 'plain weights'
        text += (f'\nBest epoch by `{run.args.get("eval_metric", "top1")}` ({weights}): {best_epoch + 1} '
                 f'({_fmt(run.results.get("best_metric"))}).\n')
    return text


def _settings_section(run: TrainingRun, tag: str, strategies: List[str]) -> str:
    text = '\n## Stimulative training settings\n'
    if run.stimulative is None:
        text += 'None: this run is common training (the recipe has no `stimulative:` section).\n'
        return text
    from dataclasses import asdict
    from ..method.config import StimulativeConfig
    try:
        config = asdict(StimulativeConfig.from_dict(run.stimulative))
    except ValueError:
        config = dict(run.stimulative)
    for key in ('sample_space', 'input_scale'):
        if isinstance(config[key], tuple):
            config[key] = list(config[key])
        elif isinstance(config[key], dict):
            config[key] = {k: list(v) for k, v in config[key].items()}
    text += ('Each training step adds, to the full network\'s loss, a loss between sampled residual sub-networks and '
             'the full network (stimulative training). ')
    if strategies:
        text += 'ST++ strategies used: ' + '; '.join(strategies) + '. '
    text += 'The `stimulative:` section of the recipe, and all settings resolved with their defaults:\n\n'
    text += _yaml_block({'stimulative': run.stimulative})
    text += '\n<details><summary>All stimulative settings (defaults filled in)</summary>\n\n'
    text += _yaml_block(config, flow=False) + '\n</details>\n'
    return text


def _recipe_section(run: TrainingRun, recipe_text: str) -> str:
    text = '\n## Training recipe\n'
    original = run.args.get('config')
    if original and os.path.isfile(original):
        try:
            body = Path(original).read_text()
        except (OSError, UnicodeDecodeError):
            body = None
        if body is not None:
            text += (f'The recipe file given to `timm-st train` (`{os.path.basename(original)}`); command-line '
                     f'options may have overridden some of its values (the resolved arguments below are what ran):\n\n'
                     f'```yaml\n{body.rstrip()}\n```\n\n')
    text += ('The resolved arguments of the run (its `args.yaml` without machine-local keys such as data_dir, output '
             'and device), shipped in this repository as `recipe.yaml`:\n\n<details><summary>recipe.yaml</summary>'
             '\n\n```yaml\n' + recipe_text.rstrip() + '\n```\n\n</details>\n')
    return text


def _cost_section(run: TrainingRun) -> str:
    a = run.args
    world = run.results.get('world_size') or a.get('world_size') or 1
    device = run.results.get('device') or a.get('device') or 'not recorded'
    batch = a.get('batch_size')
    accum = a.get('grad_accum_steps') or 1
    evaluated = [v for v in (run.folder.column('eval_loss') or []) if v is not None]
    lines = [f'- **Epochs:** {a.get("epochs") or run.results.get("epochs")}'
             + (f' ({len(run.summary)} recorded, {len(evaluated)} evaluated)' if run.summary else '')]
    rates = [v for v in (run.folder.column('train_img_per_sec') or []) if v is not None]
    times = [v for v in (run.folder.column('train_epoch_time') or []) if v is not None]
    if rates:
        lines.append(f'- **Throughput:** {sum(rates) / len(rates):.1f} training images/s (mean over {len(rates)} '
                     f'logged epochs, all devices together)')
    if times:
        total = sum(times)
        lines.append(f'- **Training time:** {_duration(total)} of training steps over the logged epochs '
                     f'({_duration(total / len(times))} per epoch, evaluation not included)')
    else:
        lines.append('- **Throughput / time:** not recorded (summary.csv has no epoch time: a train.py run, or none)')
    lines.append(f'- **Hardware:** {world} x {device}')
    if batch:
        lines.append(f'- **Batch:** {batch} per device x {world} device(s) x {accum} accumulation step(s) = '
                     f'{batch * world * accum} images per optimizer step')
    precision = f'AMP {a.get("amp_dtype")}' if a.get('amp') else 'float32'
    lines.append(f'- **Precision:** {precision}')
    return '\n## Training cost\n' + '\n'.join(lines) + '\n'


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f'{seconds / 3600:.1f} h'
    return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.1f} s'


def _reproduce_section(run: TrainingRun, repo_id: Optional[str]) -> str:
    a = run.args
    world = run.results.get('world_size') or a.get('world_size') or 1
    data = './digits' if a.get('dataset') == 'digits' else '/path/to/data'
    launcher = (f'torchrun --nproc_per_node={world} -m timm_st train' if world > 1 else 'timm-st train')
    fetch = (f'hf download {repo_id} recipe.yaml --local-dir .\n' if repo_id else '')
    text = '\n## Reproduce\n'
    text += ('With timm-st installed (the same timm version for an exact reproduction: this run used timm '
             f'{timm.__version__}, timm-st {__version__}):\n\n```bash\n{fetch}{launcher} -c recipe.yaml '
             f'--data-dir {data}\n```\n')
    if a.get('resume'):
        text += '\nThis run was resumed from a checkpoint of an earlier run with the same recipe.\n'
    if world > 1:
        text += ('\nThe learning rate in `recipe.yaml` (`lr`) is the value resolved for the run\'s global batch; '
                 'on a different number of devices, remove `lr` to rescale it from `lr_base`.\n')
    return text


def _recipe_yaml(run: TrainingRun) -> str:
    a = run.args
    world = run.results.get('world_size') or a.get('world_size') or 1
    header = ('# timm-st recipe of the run that produced these weights: its resolved arguments (args.yaml) without\n'
              '# machine-local keys (data_dir, output, experiment, device, resume, logging).\n'
              '# Run: timm-st train -c recipe.yaml --data-dir /path/to/data\n')
    if a.get('lr') is not None and a.get('batch_size'):
        global_batch = a['batch_size'] * world * (a.get('grad_accum_steps') or 1)
        header += (f'# lr {a["lr"]:g} was resolved for a global batch of {global_batch} '
                   f'({world} device(s)); remove it to rescale from lr_base on other hardware.\n')
    return header + yaml.safe_dump(_recipe(run), default_flow_style=None, sort_keys=False)


def _write_export(run: TrainingRun, folder: Path, repo_id: Optional[str], model_name: Optional[str], license: str,
                  dataset_id: Optional[str]) -> None:
    model = _create_model(run)
    data_config = _data_config(run, model)
    class_names = run.results.get('class_names')
    model_config = {}
    if isinstance(class_names, list) and len(class_names) == model.num_classes:
        model_config['label_names'] = class_names
    # the architecture's default pretrained_cfg describes someone else's weights (tag, paper, license)
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _FOREIGN_CFG_KEYS}
    model.pretrained_cfg['license'] = license
    model.pretrained_cfg.update(data_config)  # save_for_hf writes pretrained_cfg (its data_config arg is timm>=1.0.31)
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True)
    dataset_text, hub_dataset = _dataset(run, dataset_id)
    recipe_text = _recipe_yaml(run)
    name = model_name or (repo_id.split('/')[-1] if repo_id else
                          f'{run.model_name}.{describe_method(run.stimulative)[0]}_{_short(dataset_text)}')
    (folder / 'recipe.yaml').write_text(recipe_text, encoding='utf-8')
    card = _model_card(run, model, data_config, repo_id, name, license, dataset_text, hub_dataset, recipe_text)
    (folder / 'README.md').write_text(card, encoding='utf-8')
    mask = os.umask(0o022)
    os.umask(mask)
    for path in folder.iterdir():  # safetensors writes 0600; an export is meant to be shared
        os.chmod(path, 0o666 & ~mask)


def _short(dataset_text: str) -> str:
    word = dataset_text.replace('`', '').split(' (')[0].split('/')[-1].split()[-1]
    return ''.join(c for c in word.lower() if c.isalnum() or c in '-_') or 'data'


# ---------------------------------------------------------------------------------------------
# local export and push

@contextmanager
def _staging(parent: Path, name: str):
    """A fresh folder next to the destination (same file system, so it can be renamed into place)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f'.{name}.tmp-{uuid.uuid4().hex[:8]}'
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_local_dir(local_dir: Path, output_dir: Path, overwrite: bool) -> None:
    if local_dir.exists() and not local_dir.is_dir():
        raise PublishError(f'--local-dir {str(local_dir)!r} exists and is not a folder')
    out = output_dir.resolve()
    if local_dir.resolve() == out or local_dir.resolve() in out.parents:
        raise PublishError(f'--local-dir {str(local_dir)!r} would replace the training output folder; choose '
                           f'another folder')
    if local_dir.is_dir() and any(local_dir.iterdir()) and not overwrite:
        raise PublishError(f'--local-dir {str(local_dir)!r} exists and is not empty; pass --overwrite to replace '
                           f'it, or choose another folder')


def export_checkpoint(output_dir: Union[str, Path], local_dir: Union[str, Path], ema: bool = False,
                      checkpoint: str = 'best', repo_id: Optional[str] = None, overwrite: bool = False,
                      license: str = 'apache-2.0', dataset_id: Optional[str] = None,
                      model_name: Optional[str] = None) -> Path:
    """Write what `publish` would push (model.safetensors, config.json, README.md, recipe.yaml) into `local_dir`.

    `checkpoint`: 'best' (model_best.pth.tar), 'last' (last.pth.tar) or a checkpoint file name in the run's
    folder. `repo_id` only names the model in the card. The folder appears complete or not at all; an existing
    non-empty folder is replaced only with `overwrite`.
    """
    if repo_id is not None:
        _check_repo_id(repo_id)
    local_dir = Path(local_dir).absolute()
    run = TrainingRun(output_dir, checkpoint=checkpoint, ema=ema)
    _check_local_dir(local_dir, run.output_dir, overwrite)
    with _staging(local_dir.parent, local_dir.name) as tmp:
        _write_export(run, tmp, repo_id, model_name, license, dataset_id)
        if local_dir.exists():
            old = local_dir.parent / f'.{local_dir.name}.old-{uuid.uuid4().hex[:8]}'
            os.rename(local_dir, old)
            try:
                os.rename(tmp, local_dir)
            except BaseException:
                os.rename(old, local_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, local_dir)
    return local_dir


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise PublishError(f'--repo-id {repo_id!r} is not a valid repository id ({e})') from None
    if repo_id.count('/') != 1:
        raise PublishError(f'--repo-id {repo_id!r}: give the owner too, as ORG_OR_USER/NAME')


def _hub_error(action: str, e: Exception) -> PublishError:
    first = (str(e).strip().splitlines() or [''])[0][:300]
    hint = ''
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    if status in (401, 403):
        hint = '; check that your token is valid and has write access to that namespace'
    elif status is None:
        hint = '; check your network connection (nothing was published)'
    return PublishError(f'could not {action} on the Hugging Face hub ({type(e).__name__}: {first}){hint}',
                        exit_code=1)  # the hub failed, not the input


def publish(output_dir: Union[str, Path], repo_id: str, ema: bool = False, checkpoint: str = 'best',
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
        raise PublishError('no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) first; '
                           'or write the export locally with --local-dir')
    run = TrainingRun(output_dir, checkpoint=checkpoint, ema=ema)
    api = huggingface_hub.HfApi(token=token, library_name='timm-st', library_version=__version__)
    try:
        exists = api.repo_exists(repo_id, repo_type='model')
    except Exception as e:
        raise _hub_error(f'check whether {repo_id!r} exists', e) from None
    if exists and not overwrite:
        raise PublishError(f'repository {repo_id!r} already exists on the hub; pass --overwrite to upload into it '
                           f'(its weights are replaced, other files kept), or choose another --repo-id')
    with TemporaryDirectory(prefix='timm-st-publish-') as tmp:
        folder = Path(tmp)
        _write_export(run, folder, repo_id, model_name, license, dataset_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=overwrite, repo_type='model')
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type='model')
            weights = 'EMA' if ema else 'plain'
            api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type='model', revision=revision,
                commit_message=commit_message or f'Add {run.model_name} weights ({weights}, {checkpoint} checkpoint) '
                                                 f'from timm-st',
                delete_patterns=['*.safetensors', '*.bin', '*.pth', '*.pt'] if exists else None)
        except Exception as e:
            raise _hub_error(f'upload to {repo_id!r}', e) from None
    return str(getattr(url, 'url', None) or f'https://huggingface.co/{repo_id}')


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-st publish',
        description='Publish a `timm-st train` checkpoint on the Hugging Face hub as an ordinary timm model '
                    '(model.safetensors, config.json, a model card and the recipe), or write it to a local folder.')
    parser.add_argument('output_dir', metavar='OUTPUT_DIR', help='output folder of a `timm-st train` run')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME', help='hub repository to create and push to')
    parser.add_argument('--local-dir', default=None, metavar='DIR',
                        help='write what would be pushed into DIR instead (offline; with --repo-id, the card names '
                             'that repository)')
    parser.add_argument('--checkpoint', default='best', metavar='best|last|FILE',
                        help='model_best.pth.tar (default), last.pth.tar, or a checkpoint file of the run')
    parser.add_argument('--ema', action='store_true', help='publish the EMA weights (the run needs --model-ema)')
    parser.add_argument('--private', action='store_true', help='create the hub repository as private')
    parser.add_argument('--overwrite', action='store_true',
                        help='upload into an existing hub repository / replace a non-empty --local-dir')
    parser.add_argument('--revision', default=None, help='hub branch to push to (created if needed)')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--license', default='apache-2.0', help='license of the weights (default apache-2.0)')
    parser.add_argument('--dataset-id', default=None,
                        help='Hugging Face dataset id for the card metadata (guessed for CIFAR and ImageNet)')
    parser.add_argument('--model-name', default=None, help='title of the model card (default: from --repo-id)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if not args.repo_id and not args.local_dir:
        print('timm-st publish: error: give --repo-id ORG/NAME to push, or --local-dir DIR to write locally',
              file=sys.stderr)
        return 2
    common = dict(ema=args.ema, checkpoint=args.checkpoint, overwrite=args.overwrite, license=args.license,
                  dataset_id=args.dataset_id, model_name=args.model_name)
    try:
        if args.local_dir:
            path = export_checkpoint(args.output_dir, args.local_dir, repo_id=args.repo_id, **common)
            print(f'Wrote {", ".join(sorted(p.name for p in path.iterdir()))} to {path}\n'
                  f"Load it with timm.create_model('local-dir:{path}', pretrained=True)", flush=True)
        else:
            url = publish(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, **common)
            print(f'Published {url}\n'
                  f"Load it with timm.create_model('hf-hub:{args.repo_id}', pretrained=True)", flush=True)
    except PublishError as e:
        print(f'timm-st publish: error: {e}', file=sys.stderr)
        return e.exit_code
    return 0
