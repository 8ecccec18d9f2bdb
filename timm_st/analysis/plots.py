"""PNG plots of a `timm-st analyze` result (matplotlib, Agg backend: no display needed).

Each function takes the `analysis.json` dictionary and writes one figure. Sources of one group
(the seeds of one arm) share a colour; a source outside any group is its own group.
"""
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['plot_top1_vs_flops', 'plot_accuracy_profile', 'plot_lesions', 'plot_training_curves']

PathLike = Union[str, Path]


def _group_colours(analysis: Mapping[str, Any]) -> Dict[str, Any]:
    cmap = plt.get_cmap('tab10')
    return {g['name']: cmap(i % 10) for i, g in enumerate(analysis['groups'])}


def _labelled_once(ax, colour, label, seen, **kwargs) -> Dict[str, Any]:
    """`label=` only for the first artist of a group, so the legend names each group once."""
    kwargs['color'] = colour
    if label not in seen:
        seen.add(label)
        kwargs['label'] = label
    return kwargs


def _finish(ax, analysis, xlabel: str, title: str, ylabel: str = 'top-1 (%)') -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=_legend_title(analysis), fontsize=8)


def _save(fig, path: PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mode_axes(analysis, width: float = 5.5, height: float = 4.2):
    modes = analysis['bn_modes']
    fig, axes = plt.subplots(1, len(modes), figsize=(width * len(modes), height), squeeze=False)
    return fig, list(zip(modes, axes[0]))


def _legend_title(analysis) -> str:
    return 'group (runs)' if any(len(g['members']) > 1 for g in analysis['groups']) else 'source'


def _group_label(analysis, name: str) -> str:
    group = next(g for g in analysis['groups'] if g['name'] == name)
    return f'{name} ({len(group["members"])})' if len(group['members']) > 1 else name


def plot_top1_vs_flops(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Sub-network top-1 against relative FLOPs, one colour per group; the full network is a star."""
    colours = _group_colours(analysis)
    fig, panels = _mode_axes(analysis)
    for mode, ax in panels:
        seen = set()
        for s in analysis['sources']:
            label = _group_label(analysis, s['group'])
            subs = [e for e in s['subnets'] if not e['full']]
            full = next(e for e in s['subnets'] if e['full'])
            ax.scatter([e['relative_flops'] for e in subs], [e[mode]['top1'] for e in subs], s=12, alpha=0.6,
                       **_labelled_once(ax, colours[s['group']], label, seen))
            ax.scatter([full['relative_flops']], [full[mode]['top1']], marker='*', s=160, edgecolors='black',
                       linewidths=0.6, color=colours[s['group']], zorder=3)
        _finish(ax, analysis, 'relative FLOPs (full network = 1)', f'sub-networks, BN {mode} (star: full network)')
    _save(fig, path)


def plot_accuracy_profile(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Every source's sub-network top-1 sorted from best to worst (a flat profile = little loafing);
    dashed: the full network."""
    colours = _group_colours(analysis)
    fig, panels = _mode_axes(analysis)
    for mode, ax in panels:
        seen = set()
        for s in analysis['sources']:
            colour = colours[s['group']]
            values = sorted((e[mode]['top1'] for e in s['subnets'] if not e['full']), reverse=True)
            full = next(e for e in s['subnets'] if e['full'])[mode]['top1']
            ax.plot(range(1, len(values) + 1), values, linewidth=1.4, alpha=0.85,
                    **_labelled_once(ax, colour, _group_label(analysis, s['group']), seen))
            ax.axhline(full, color=colour, linestyle='--', linewidth=0.8, alpha=0.6)
        _finish(ax, analysis, 'sub-network rank (best first)', f'sorted sub-network accuracy, BN {mode} (dashed: full)')
    _save(fig, path)


def plot_lesions(analysis: Mapping[str, Any], path: PathLike) -> None:
    """Left: top-1 with k random droppable blocks removed (mean +- std over draws). Right: top-1 with each
    droppable block removed alone (o) and with it swapped with the next block of its stage (x)."""
    colours = _group_colours(analysis)
    fig, (ax_k, ax_single) = plt.subplots(1, 2, figsize=(12, 4.2))
    seen_k, seen_single = set(), set()
    for s in analysis['sources']:
        lesion = s.get('lesion')
        if not lesion:
            continue
        colour, label = colours[s['group']], _group_label(analysis, s['group'])
        full = lesion['full']
        ks = [0] + [r['k'] for r in lesion['random']]
        means = [full] + [r['top1_mean'] for r in lesion['random']]
        stds = [0.0] + [r['top1_std'] for r in lesion['random']]
        ax_k.plot(ks, means, marker='o', markersize=3, **_labelled_once(ax_k, colour, label, seen_k))
        ax_k.fill_between(ks, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                          color=colour, alpha=0.12)
        position = {(r['stage'], r['block']): i for i, r in enumerate(lesion['single'])}
        ax_single.plot(range(len(lesion['single'])), [r['top1'] for r in lesion['single']], marker='o', markersize=3,
                       **_labelled_once(ax_single, colour, label, seen_single))
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
    colours = _group_colours(analysis)
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    seen_e, seen_t = set(), set()
    for s in analysis['sources']:
        curve = s.get('training_curve')
        if not curve:
            continue
        colour, label = colours[s['group']], _group_label(analysis, s['group'])
        validated = [i for i, v in enumerate(curve['eval_top1']) if v is not None]  # epochs without validation: empty
        top1 = [curve['eval_top1'][i] for i in validated]
        ax_epoch.plot([curve['epoch'][i] for i in validated], top1, linewidth=1.2,
                      **_labelled_once(ax_epoch, colour, label, seen_e))
        times = curve.get('epoch_time')
        if times and all(t is not None for t in times):
            cumulative, total = [], 0.0
            for t in times:
                total += float(t)
                cumulative.append(total)
            ax_time.plot([cumulative[i] for i in validated], top1, linewidth=1.2,
                         **_labelled_once(ax_time, colour, label, seen_t))
    _finish(ax_epoch, analysis, 'epoch', 'training curves (summary.csv)', 'eval top-1 (%)')
    _finish(ax_time, analysis, 'cumulative training time (s; runs without epoch times are absent)', '',
            'eval top-1 (%)')
    _save(fig, path)
