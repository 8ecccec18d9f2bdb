"""The model card (README.md) of a published run: what the weights are, how well they do, how they were made.

`model_card` writes the card of a `publish.PublishedRun` with timm's own `generate_readme` (metadata,
description, model details, usage with plain timm) followed by sections of its own: results (the
published weights' recorded accuracy, the sub-networks of results.json), the stimulative settings,
the recipe (the original file and the resolved `recipe.yaml`), the training cost, how to reproduce
the run, and the citations. Every number comes from the run folder (summary.csv, results.json, the
checkpoint); what was not recorded is said to be so.
"""
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
import yaml

import timm
from timm.models._hub import generate_readme

from .. import __version__
from ..method.config import describe_method
from .data import DIGITS, is_remote

if TYPE_CHECKING:
    from .publish import PublishedRun

__all__ = ['model_card', 'card_title', 'CITATIONS']

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


def _registered_by_timm_st(model_name: str) -> bool:
    try:
        return timm.models.model_entrypoint(model_name).__module__.startswith('timm_st')
    except Exception:
        return False


def _dataset(run: 'PublishedRun', dataset_id: Optional[str]):
    """(text for the card, Hugging Face dataset id or None)."""
    name = run.args.get('dataset') or ''
    if name == DIGITS:
        text, hub = 'digits (scikit-learn 8x8 handwritten digits, the timm-st demo set)', None
    elif is_remote(name):
        prefix, base = name.split('/', 1)
        hub = base if prefix in ('hfds', 'hfids') else _DATASET_IDS.get(base.lower())
        text = name
    else:
        base = os.path.basename(os.path.normpath(run.args.get('data_dir') or '')) or 'image folder'
        hub = _DATASET_IDS.get(base.lower())
        text = f'image folder `{base}`' + (f' ({name})' if name else '')
    return text, (dataset_id or hub)


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def _mean_std(values: Sequence[float]):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _yaml_block(data: Any, flow: Optional[bool] = None) -> str:
    return '```yaml\n' + yaml.safe_dump(data, default_flow_style=flow, sort_keys=False).rstrip() + '\n```\n'


def _details(run: 'PublishedRun', model: torch.nn.Module, data_config: Dict[str, Any], license: str,
             dataset_text: str, dataset_id: Optional[str], method: str, strategies: List[str]) -> Dict[str, Any]:
    """The "Model Details" of timm's card layout."""
    arch = run.model_name
    weights = 'EMA' if run.ema else 'plain (non-EMA)'
    which = {'best': 'best', 'last': 'last'}.get(run.checkpoint_name, run.checkpoint_path.name)
    epochs = run.args.get('epochs') or run.results.get('epochs')
    epoch_text = f'epoch {run.epoch + 1} of {epochs}' if isinstance(run.epoch, int) else 'epoch not recorded'
    eval_size = data_config['input_size']
    train_sizes = run.args.get('train_img_sizes')
    train_text = (' / '.join(f'{s} x {s}' for s in train_sizes) if train_sizes else
                  f'{eval_size[1]} x {eval_size[2]}')
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'`{arch}`' + (' (registered by timm-st: needs `import timm_st`)'
                                       if _registered_by_timm_st(arch) else ' (timm)'),
        'Model Stats': {
            'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
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
    return details


def _usage(run: 'PublishedRun', repo_id: Optional[str]) -> str:
    """Loading and running the model with plain timm."""
    arch = run.model_name
    prefix = 'import timm_st  # registers ' + arch + ' with timm\n' if _registered_by_timm_st(arch) else ''
    ref = f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME'
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
    return usage


def card_title(run: 'PublishedRun', repo_id: Optional[str], model_name: Optional[str] = None) -> str:
    """The card's title: `model_name`, else the repository's name, else ARCH.METHOD_DATASET."""
    if model_name:
        return model_name
    if repo_id:
        return repo_id.split('/')[-1]
    return f'{run.model_name}.{describe_method(run.stimulative)[0]}_{_short(_dataset(run, None)[0])}'


def model_card(run: 'PublishedRun', model: torch.nn.Module, data_config: Dict[str, Any], recipe_text: str, *,
               repo_id: Optional[str] = None, model_name: Optional[str] = None, license: str = 'apache-2.0',
               dataset_id: Optional[str] = None) -> str:
    """The README.md of the export of `run` (module docstring); `model` carries the published weights,
    `data_config` is the evaluation preprocessing written to config.json, `recipe_text` is recipe.yaml."""
    arch = run.model_name
    tag, method, strategies = describe_method(run.stimulative)
    dataset_text, dataset_id = _dataset(run, dataset_id)
    description = (f'A {arch} image classification model trained on {dataset_text} with {method}, using timm-st '
                   f'recipes on timm\'s training pipeline. Stimulative training adds no parameters: these are plain '
                   f'timm weights of `{arch}`.')
    if _registered_by_timm_st(arch):
        description += (f'\n\n**`{arch}` is registered with timm by timm-st**: `import timm_st` before '
                        f'`timm.create_model` (the weights themselves are a plain state dict).')
    stimulative_tag = ['stimulative-training'] if tag in ('st', 'stpp') else []
    card = {'tags': ['image-classification', 'timm', 'timm-st'] + stimulative_tag,
            'license': license, 'library_name': 'timm', 'description': description,
            'details': _details(run, model, data_config, license, dataset_text, dataset_id, method, strategies),
            'usage': _usage(run, repo_id)}
    text = generate_readme(card, card_title(run, repo_id, model_name))
    text += _results_section(run, tag, data_config)
    text += _settings_section(run, tag, strategies)
    text += _recipe_section(run, recipe_text)
    text += _cost_section(run)
    text += _reproduce_section(run, repo_id)
    text += '\n## Citation\n'
    for citation in CITATIONS:
        text += f'```bibtex\n{citation}\n```\n'
    return text


def _results_section(run: 'PublishedRun', tag: str, data_config: Dict[str, Any]) -> str:
    which = 'EMA' if run.ema else 'plain'
    text = '\n## Results\n'
    split = (f'**the training data** (`{run.args.get("train_split", "train")}`, explicit `eval_on_train`: these '
             f'numbers are not held-out accuracy)' if run.args.get('eval_on_train') else
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


def _settings_section(run: 'PublishedRun', tag: str, strategies: List[str]) -> str:
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


def _recipe_section(run: 'PublishedRun', recipe_text: str) -> str:
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


def _cost_section(run: 'PublishedRun') -> str:
    a = run.args
    world = run.results.get('world_size') or a.get('world_size') or 1
    device = run.results.get('device') or a.get('device') or 'not recorded'
    batch = a.get('batch_size')
    accum = a.get('grad_accum_steps') or 1
    evaluated = [v for v in (run.folder.column('eval_loss') or []) if v is not None]
    lines = [f'- **Epochs:** {a.get("epochs") or run.results.get("epochs")}'
             + (f' ({len(run.folder.summary)} recorded, {len(evaluated)} evaluated)' if run.folder.summary else '')]
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


def _reproduce_section(run: 'PublishedRun', repo_id: Optional[str]) -> str:
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



def _short(dataset_text: str) -> str:
    word = dataset_text.replace('`', '').split(' (')[0].split('/')[-1].split()[-1]
    return ''.join(c for c in word.lower() if c.isalnum() or c in '-_') or 'data'


