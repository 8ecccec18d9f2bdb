"""PNG plots of a `timm-st analyze` result (matplotlib, Agg backend: no display needed).

Each function takes the `analysis.json` dictionary and writes one figure. Sources of one group
(the seeds of one arm) share a colour; a source outside any group is its own group.
"""
import itertools
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['plot_top1_vs_flops', 'plot_accuracy_profile', 'plot_lesions', 'plot_training_curves']

PathLike = Union[str, Path]


def _sources(analysis: Mapping[str, Any], key: Optional[str] = None) -> Iterator[Tuple[Mapping, Any, str]]:
    """`(source, its group's colour, its group's legend label)` of every source (with a non-empty `key`)."""
    groups = analysis['groups']
    colours = {g['name']: plt.get_cmap('tab10')(i % 10) for i, g in enumerate(groups)}
    labels = {g['name']: f'{g["name"]} ({len(g["members"])})' if len(g['members']) > 1 else g['name'] for g in groups}
    for s in analysis['sources']:
        if key is None or s.get(key):
            yield s, colours[s['group']], labels[s['group']]


def _labelled_once(ax, colour, label) -> Dict[str, Any]:
    """`label=` only for the first artist of a group on `ax`, so the legend names each group once."""
    return {'color': colour} if label in ax.get_legend_handles_labels()[1] else {'color': colour, 'label': label}


def _finish(ax, analysis, xlabel: str, title: str, ylabel: str = 'top-1 (%)') -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        several = any(len(g['members']) > 1 for g in analysis['groups'])
        ax.legend(title='group (runs)' if several else 'source', fontsize=8)


def _save(fig, path: PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mode_axes(analysis, width: float = 5.5, height: float = 4.2):
    modes = analysis['bn_modes']
    fig, axes = plt.subplots(1, len(modes), figsize=(width * len(modes), height), squeeze=False)
    return fig, list(zip(modes, axes[0]))


def plot_top1_vs_flops(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Sub-network top-1 against relative FLOPs, one colour per group; the full network is a star."""
    fig, panels = _mode_axes(analysis)
    for mode, ax in panels:
        for s, colour, label in _sources(analysis):
            subs = [e for e in s['subnets'] if not e['full']]
            full = next(e for e in s['subnets'] if e['full'])
            ax.scatter([e['relative_flops'] for e in subs], [e[mode]['top1'] for e in subs], s=12, alpha=0.6,
                       **_labelled_once(ax, colour, label))
            ax.scatter([full['relative_flops']], [full[mode]['top1']], marker='*', s=160, edgecolors='black',
                       linewidths=0.6, color=colour, zorder=3)
        _finish(ax, analysis, 'relative FLOPs (full network = 1)', f'sub-networks, BN {mode} (star: full network)')
    _save(fig, path)


def plot_accuracy_profile(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Every source's sub-network top-1 sorted from best to worst (a flat profile = little loafing);
    dashed: the full network."""
    fig, panels = _mode_axes(analysis)
    for mode, ax in panels:
        for s, colour, label in _sources(analysis):
            values = sorted((e[mode]['top1'] for e in s['subnets'] if not e['full']), reverse=True)
            full = next(e for e in s['subnets'] if e['full'])[mode]['top1']
            ax.plot(range(1, len(values) + 1), values, linewidth=1.4, alpha=0.85, **_labelled_once(ax, colour, label))
            ax.axhline(full, color=colour, linestyle='--', linewidth=0.8, alpha=0.6)
        _finish(ax, analysis, 'sub-network rank (best first)', f'sorted sub-network accuracy, BN {mode} (dashed: full)')
    _save(fig, path)


def plot_lesions(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Left: top-1 with k random droppable blocks removed (mean +- std over draws). Right: top-1 with each
    droppable block removed alone (o) and with it swapped with the next block of its stage (x)."""
    fig, (ax_k, ax_single) = plt.subplots(1, 2, figsize=(12, 4.2))
    for s, colour, label in _sources(analysis, 'lesion'):
        lesion = s['lesion']
        full = lesion['full']
        ks = [0] + [r['k'] for r in lesion['random']]
        means = [full] + [r['top1_mean'] for r in lesion['random']]
        stds = [0.0] + [r['top1_std'] for r in lesion['random']]
        ax_k.plot(ks, means, marker='o', markersize=3, **_labelled_once(ax_k, colour, label))
        ax_k.fill_between(ks, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                          color=colour, alpha=0.12)
        position = {(r['stage'], r['block']): i for i, r in enumerate(lesion['single'])}
        ax_single.plot(range(len(lesion['single'])), [r['top1'] for r in lesion['single']], marker='o', markersize=3,
                       **_labelled_once(ax_single, colour, label))
        swaps = lesion.get('swap') or []
        ax_single.scatter([position[(r['stage'], r['blocks'][0])] for r in swaps], [r['top1'] for r in swaps],
                          marker='x', color=colour, s=25)
        ax_single.axhline(full, color=colour, linestyle='--', linewidth=0.8, alpha=0.6)
    _finish(ax_k, analysis, 'droppable blocks removed at random', 'random lesions (band: std over draws)')
    _finish(ax_single, analysis, 'droppable block (network order)',
            'o: block removed alone, x: swapped with the next (dashed: intact)')
    _save(fig, path)


def plot_training_curves(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Eval top-1 of every run folder against epoch and against cumulative training time."""
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    for s, colour, label in _sources(analysis, 'training_curve'):
        curve = s['training_curve']
        validated = [i for i, v in enumerate(curve['eval_top1']) if v is not None]  # epochs without validation: empty
        top1 = [curve['eval_top1'][i] for i in validated]
        ax_epoch.plot([curve['epoch'][i] for i in validated], top1, linewidth=1.2,
                      **_labelled_once(ax_epoch, colour, label))
        times = curve.get('epoch_time')
        if times and all(t is not None for t in times):
            cumulative = list(itertools.accumulate(float(t) for t in times))
            ax_time.plot([cumulative[i] for i in validated], top1, linewidth=1.2,
                         **_labelled_once(ax_time, colour, label))
    _finish(ax_epoch, analysis, 'epoch', 'training curves (summary.csv)', 'eval top-1 (%)')
    _finish(ax_time, analysis, 'cumulative training time (s; runs without epoch times are absent)', '',
            'eval top-1 (%)')
    _save(fig, path)
