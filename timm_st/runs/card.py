"""The model card (README.md) of a published run: what the weights are, how well they do, how they were made.

`model_card` writes the card of a `publish.PublishedRun` with timm's own `generate_readme` (metadata,
description, model details, usage with plain timm) followed by sections of its own: results (the
published weights' recorded accuracy, the sub-networks of results.json), the stimulative settings,
the recipe (the original file and the resolved `recipe.yaml`), the training cost, how to reproduce
the run, and the citations. The text is `card_template.md` (package data); every number comes from the
run folder (summary.csv, results.json, the checkpoint); what was not recorded is said to be so.
"""
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import yaml

import timm
from timm.models._hub import generate_readme

from .. import __version__
from ..method.config import StimulativeConfig, describe_method
from .data import DIGITS, is_remote

if TYPE_CHECKING:
    from .publish import PublishedRun

__all__ = ['model_card', 'card_title']

_DATASET_IDS = {  # timm dataset name (after the 'torch/' etc. prefix) -> Hugging Face dataset id
    'cifar10': 'cifar10', 'cifar100': 'cifar100', 'imagenet': 'imagenet-1k', 'imagenet2012': 'imagenet-1k',
    'imagenet-1k': 'imagenet-1k', 'imagenet1k': 'imagenet-1k', 'ilsvrc2012': 'imagenet-1k', 'in1k': 'imagenet-1k',
}
# the template's fragments: `<!-- NAME -->` starts one, which ends at the line break before the next
_PARTS = re.split(r'^<!-- (\w+) -->\n', (Path(__file__).parent / 'card_template.md').read_text('utf-8'), flags=re.M)
_TEXT = {name: Template(body[:-1]) for name, body in zip(_PARTS[1::2], _PARTS[2::2])}


def _text(fragment: str, /, **values: Any) -> str:
    return _TEXT[fragment].substitute(values)


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


def _yaml(data: Any, flow: Optional[bool] = None) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, sort_keys=False).rstrip()


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
        'Weights': f'{weights} weights of the {which} checkpoint (`{run.checkpoint_path.name}`, {epoch_text})',
        'Papers': [
            'Stimulative Training of Residual Networks: A Social Psychology Perspective of Loafing (NeurIPS 2022)',
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


def card_title(run: 'PublishedRun', repo_id: Optional[str], model_name: Optional[str] = None) -> str:
    """The card's title: `model_name`, else the repository's name, else ARCH.METHOD_DATASET."""
    if model_name:
        return model_name
    if repo_id:
        return repo_id.split('/')[-1]
    word = _dataset(run, None)[0].replace('`', '').split(' (')[0].split('/')[-1].split()[-1]
    short = ''.join(c for c in word.lower() if c.isalnum() or c in '-_') or 'data'
    return f'{run.model_name}.{describe_method(run.stimulative)[0]}_{short}'


def model_card(run: 'PublishedRun', model: torch.nn.Module, data_config: Dict[str, Any], recipe_text: str, *,
               repo_id: Optional[str] = None, model_name: Optional[str] = None, license: str = 'apache-2.0',
               dataset_id: Optional[str] = None) -> str:
    """The README.md of the export of `run` (module docstring); `model` carries the published weights,
    `data_config` is the evaluation preprocessing written to config.json, `recipe_text` is recipe.yaml."""
    arch = run.model_name
    registered = _registered_by_timm_st(arch)
    tag, method, strategies = describe_method(run.stimulative)
    dataset_text, dataset_id = _dataset(run, dataset_id)
    description = _text('description', arch=arch, dataset=dataset_text, method=method)
    usage = _text('usage', import_timm_st=f'import timm_st  # registers {arch} with timm\n' if registered else '',
                  ref=f'hf-hub:{repo_id}' if repo_id else 'hf-hub:ORG/NAME', k=min(5, run.num_classes))
    stimulative_tag = ['stimulative-training'] if tag in ('st', 'stpp') else []
    card = {'tags': ['image-classification', 'timm', 'timm-st'] + stimulative_tag,
            'license': license, 'library_name': 'timm',
            'description': description + (_text('registered', arch=arch) if registered else ''),
            'details': _details(run, model, data_config, license, dataset_text, dataset_id, method, strategies),
            'usage': usage + ('' if repo_id else _text('usage_local'))}
    return (generate_readme(card, card_title(run, repo_id, model_name)) + _results_section(run, tag, data_config)
            + _settings_section(run, strategies) + _recipe_section(run, recipe_text) + _cost_section(run)
            + _reproduce_section(run, repo_id) + _text('citation'))


def _subnets_section(run: 'PublishedRun', tag: str, subnets: Dict[str, Any], entries: List[Dict[str, Any]]) -> str:
    """The sub-networks of results.json: mean rows of the results table, then each one evaluated."""
    text = ''
    for bn, what in (('running', "the full network's BatchNorm statistics"),
                     ('recalibrate', f'own BatchNorm statistics re-estimated on '
                                     f'{subnets["recalibrate"].get("calib_images")} training images')):
        stats, top5 = subnets[bn], [s[bn]['top5'] for s in entries]
        mean = sum(top5) / len(top5)
        text += _text('subnet_row', count=subnets['count'], space=subnets.get('space'), what=what,
                      min=_fmt(stats.get('top1_min')), max=_fmt(stats.get('top1_max')),
                      top1=_fmt(stats.get('top1_mean')), top1_std=_fmt(stats.get('top1_std')), top5=_fmt(mean),
                      top5_std=_fmt(math.sqrt(sum((v - mean) ** 2 for v in top5) / len(top5))))
    if run.ema or not run.is_last:
        full = run.results.get('full') or {}
        text += _text('subnets_not_published', top1=_fmt(full.get('top1')), top5=_fmt(full.get('top5')))
    rows = ''.join(f'| {s["depths"]} | {_fmt(s["running"]["top1"])} | {_fmt(s["running"]["top5"])} | '
                   f'{_fmt(s["recalibrate"]["top1"])} | {_fmt(s["recalibrate"]["top5"])} |\n' for s in entries)
    trained = ('stimulative training makes these sub-networks strong on their own.' if tag in ('st', 'stpp') else
               'this common-training run is a baseline for them.')
    return text + _text('subnets_table', trained=trained, rows=rows)


def _results_section(run: 'PublishedRun', tag: str, data_config: Dict[str, Any]) -> str:
    split = (_text('split_train', split=run.args.get('train_split', 'train')) if run.args.get('eval_on_train') else
             _text('split_validation', split=run.args.get('val_split', 'validation')))
    published = run.metrics_at_checkpoint(run.ema)
    epoch = f'epoch {run.epoch + 1}' if isinstance(run.epoch, int) else 'chosen epoch'
    text = _text('results', runner=run.folder.written_by, split=split, size=data_config['input_size'][-1],
                 crop_pct=data_config['crop_pct'], weights='EMA' if run.ema else 'plain', epoch=epoch,
                 top1=_fmt(published.get('top1')), top5=_fmt(published.get('top5')))
    other = run.metrics_at_checkpoint(not run.ema)
    if other:
        text += (f'| Full network | {"plain" if run.ema else "EMA"}, {epoch} (not published) | '
                 f'{_fmt(other.get("top1"))} | {_fmt(other.get("top5"))} |\n')
    if not published:
        text += ('\nThe accuracy of the published weights was not recorded'
                 + (' (EMA weights were not evaluated during training, e.g. `model_ema_force_cpu`).\n'
                    if run.ema else '.\n'))
    subnets = run.results.get('subnets') or {}
    if subnets.get('count') and subnets.get('subnets'):
        text += _subnets_section(run, tag, subnets, subnets['subnets'])
    elif subnets.get('skipped'):
        text += f'\nSub-networks were not evaluated: {subnets["skipped"]}.\n'
    best_epoch = run.results.get('best_epoch')
    if best_epoch is not None:
        weights = 'EMA weights' if run.folder.ema_validated else 'plain weights'
        text += (f'\nBest epoch by `{run.args.get("eval_metric", "top1")}` ({weights}): {best_epoch + 1} '
                 f'({_fmt(run.results.get("best_metric"))}).\n')
    return text


def _settings_section(run: 'PublishedRun', strategies: List[str]) -> str:
    if run.stimulative is None:
        return _text('settings_none')
    try:
        config = asdict(StimulativeConfig.from_dict(run.stimulative))
    except ValueError:
        config = dict(run.stimulative)
    for key in ('sample_space', 'input_scale'):
        if isinstance(config[key], tuple):
            config[key] = list(config[key])
        elif isinstance(config[key], dict):
            config[key] = {k: list(v) for k, v in config[key].items()}
    return _text('settings', strategies='ST++ strategies used: ' + '; '.join(strategies) + '. ' if strategies else '',
                 section=_yaml({'stimulative': run.stimulative}), resolved=_yaml(config, flow=False))


def _recipe_section(run: 'PublishedRun', recipe_text: str) -> str:
    original, file_text = run.args.get('config'), ''
    if original and os.path.isfile(original):
        try:
            file_text = _text('recipe_file', name=os.path.basename(original), text=Path(original).read_text().rstrip())
        except (OSError, UnicodeDecodeError):
            pass
    return _text('recipe', file=file_text, recipe=recipe_text.rstrip())


def _cost_section(run: 'PublishedRun') -> str:
    a, world = run.args, run.world_size
    batch, accum = a.get('batch_size'), a.get('grad_accum_steps') or 1
    evaluated = [v for v in (run.folder.column('eval_loss') or []) if v is not None]
    lines = [f'- **Epochs:** {a.get("epochs") or run.results.get("epochs")}'
             + (f' ({len(run.folder.summary)} recorded, {len(evaluated)} evaluated)' if run.folder.summary else '')]
    rates = [v for v in (run.folder.column('train_img_per_sec') or []) if v is not None]
    times = [v for v in (run.folder.column('train_epoch_time') or []) if v is not None]
    if rates:
        lines.append(f'- **Throughput:** {sum(rates) / len(rates):.1f} training images/s (mean over {len(rates)} '
                     f'logged epochs, all devices together)')
    if times:
        lines.append(f'- **Training time:** {_duration(sum(times))} of training steps over the logged epochs '
                     f'({_duration(sum(times) / len(times))} per epoch, evaluation not included)')
    else:
        lines.append('- **Throughput / time:** not recorded (summary.csv has no epoch time: a train.py run, or none)')
    lines.append(f'- **Hardware:** {world} x {run.results.get("device") or a.get("device") or "not recorded"}')
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
    world = run.world_size
    text = _text('reproduce', timm=timm.__version__, timm_st=__version__,
                 fetch=f'hf download {repo_id} recipe.yaml --local-dir .\n' if repo_id else '',
                 launcher=f'torchrun --nproc_per_node={world} -m timm_st train' if world > 1 else 'timm-st train',
                 data='./digits' if run.args.get('dataset') == DIGITS else '/path/to/data')
    return (text + (_text('reproduce_resumed') if run.args.get('resume') else '')
            + (_text('reproduce_lr') if world > 1 else ''))
