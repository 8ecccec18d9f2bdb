"""The report of one analysis: `analysis.json`, `subnets.csv`, the plots and the table.

`assemble` turns a study and its measurements into the `analysis.json` dictionary: per source its
kind, weights, data config, training cost (`run_cost`, from the run's summary.csv), the statistics of
each BatchNorm mode (`subnet_statistics`: full top-1, sub-network mean/std/min/max, loafing gap),
every sub-network's depths, relative FLOPs and metrics, the lesion study and the training curve; per
group (the seeds of one arm; a single source is a group of one) every statistic as mean and sample
std over its members (`group_statistics`). `write_outputs` writes the files, `format_table` the text
the command prints.
"""
import csv
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..runs.folder import RunFolder
from .evaluation import subnet_statistics
from .study import space_size

__all__ = ['assemble', 'write_outputs', 'format_table', 'group_statistics', 'run_cost', 'STATISTICS', 'COSTS']

STATISTICS = ('full_top1', 'subnet_mean', 'subnet_std', 'subnet_min', 'subnet_max', 'loafing_gap')
COSTS = ('epochs', 'img_per_sec', 'train_time')
_METRICS = ('top1', 'top5', 'loss')


def group_statistics(members: Sequence[Mapping[str, Optional[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """For every key of the members' statistics: mean and sample std (n - 1) over the members (seeds);
    std is None for a single member, and a key missing in any member is None."""
    out = {}
    for key in dict.fromkeys(k for m in members for k in m):
        values = [m.get(key) for m in members]
        known = None not in values
        out[key] = {'mean': statistics.fmean(map(float, values)) if known else None,
                    'std': statistics.stdev(map(float, values)) if known and len(values) > 1 else None,
                    'n': len(values)}
    return out


def run_cost(run: Optional[RunFolder]) -> Dict[str, Optional[float]]:
    """Epochs trained, mean images/s and total training time, from the run's summary.csv (None where it lacks them)."""
    if run is None:
        return {k: None for k in COSTS}
    epochs = run.column('epoch')
    clean = lambda values: [float(v) for v in values if v is not None] if values else []
    img_per_sec = clean(run.column('train_img_per_sec'))  # timm-st train's names, as timm's update_summary writes
    epoch_time = clean(run.column('train_epoch_time'))
    return {'epochs': len(epochs) if epochs else None,
            'img_per_sec': statistics.fmean(img_per_sec) if img_per_sec else None,
            'train_time': sum(epoch_time) if epoch_time else None}


def _training_curve(run: Optional[RunFolder]) -> Optional[Dict[str, List]]:
    if run is None or not run.column('eval_top1'):
        return None
    return {'epoch': run.column('epoch'), 'eval_top1': run.column('eval_top1'),
            'epoch_time': run.column('train_epoch_time')}


def _source_entry(m, plans, modes: Sequence[str], ema: bool) -> Dict[str, Any]:
    """One source of analysis.json from its `measure.Measurement`."""
    s = m.source
    subnets = [{'depths': list(plan.depths), 'full': i == 0, 'relative_flops': m.flops[i],
                **{mode: {k: m.per_mode[mode][i][k] for k in (*_METRICS, 'samples')} for mode in modes}}
               for i, plan in enumerate(plans)]
    stats = {mode: subnet_statistics(subnets[0][mode]['top1'], [e[mode]['top1'] for e in subnets[1:]])
             for mode in modes}
    return {
        'label': s.label, 'source': s.spec, 'kind': s.kind, 'group': s.group, 'model': s.model_name,
        'checkpoint': s.checkpoint, 'ema': bool(ema) if s.checkpoint else False,
        'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in s.data_config.items()},
        'cost': run_cost(s.run), 'statistics': stats, 'subnets': subnets, 'lesion': m.lesion,
        'evaluation': m.evaluation, 'training_curve': _training_curve(s.run),
    }


def assemble(study, measured: Sequence[Any], *, command: str, ema: bool, max_samples: Optional[int],
             calib_images: int, seed: int) -> Dict[str, Any]:
    """The analysis.json dictionary of a `study.Study` and its `measure.Measurement`s (module docstring)."""
    modes, data = study.modes, study.data
    sources = [_source_entry(m, study.plans, modes, ema) for m in measured]
    groups = []
    for name in dict.fromkeys(s['group'] for s in sources):
        members = [s for s in sources if s['group'] == name]
        groups.append({'name': name, 'members': [m['label'] for m in members],
                       'statistics': {mode: group_statistics([m['statistics'][mode] for m in members])
                                      for mode in modes},
                       'cost': group_statistics([m['cost'] for m in members])})
    calibration = None
    if 'recalibrate' in modes:
        subset = min(calib_images, study.train_size)
        batch = min(data.batch_size, subset)
        calibration = {'images': subset // batch * batch, 'split': data.train_split, 'batch_size': batch,
                       'seed': seed, 'transform': "each run's training augmentation (args.yaml; timm's defaults "
                                                  "without a run), on a fixed random subset, seeded; whole batches"}
    return {
        'command': command,
        'space': {'spec': study.space, 'from': study.space_from, 'max_drop': list(study.max_drop),
                  'members': space_size(study.max_drop), 'evaluated': study.plans_described,
                  'stage_depths': list(study.plans[0].depths)},
        'bn_modes': modes,
        'calibration': calibration,
        'data': {'dataset': data.shown, 'split': data.split, 'classes': study.num_classes, 'max_samples': max_samples},
        'sources': sources,
        'groups': groups,
    }


def write_outputs(analysis: Mapping[str, Any], output_dir: Path) -> None:
    """analysis.json, subnets.csv (one row per source and sub-network) and the PNG plots, into `output_dir`."""
    from . import plots
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / 'analysis.json', 'w') as f:
        json.dump(analysis, f, indent=2)
    modes = analysis['bn_modes']
    with open(output_dir / 'subnets.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['source', 'group', 'depths', 'full', 'relative_flops'] +
                        [f'{k}_{mode}' for mode in modes for k in _METRICS])
        for s in analysis['sources']:
            for e in s['subnets']:
                writer.writerow([s['label'], s['group'], '-'.join(map(str, e['depths'])), int(e['full']),
                                 f'{e["relative_flops"]:.6f}'] + [f'{e[mode][k]:.4f}' for mode in modes for k in _METRICS])
    plots.plot_top1_vs_flops(analysis, output_dir / 'top1_vs_flops.png')
    plots.plot_accuracy_profile(analysis, output_dir / 'accuracy_profile.png')
    if any(s['lesion'] for s in analysis['sources']):
        plots.plot_lesions(analysis, output_dir / 'lesions.png')
    if sum(s['training_curve'] is not None for s in analysis['sources']) >= 2:
        plots.plot_training_curves(analysis, output_dir / 'training_curves.png')


def _fmt(stat: Optional[Mapping[str, Any]], digits: int = 2) -> str:
    if stat is None or stat.get('mean') is None:
        return '-'
    return f'{stat["mean"]:.{digits}f}' + (f' +- {stat["std"]:.{digits}f}' if stat.get('std') is not None else '')


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
                        [_fmt(g['cost'][k], 0) for k in COSTS])
    widths = [max(len(r[i]) for r in rows + [columns]) for i in range(len(columns))]
    line = lambda r: '  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    note = ('mean +- std over the runs of each group (sample std); "sub std" is the spread over sub-networks; '
            'top-1 in %')
    return '\n'.join([head, line(columns), line(['-' * w for w in widths])] + [line(r) for r in rows] + [note])
