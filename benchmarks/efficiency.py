"""The cure per unit of compute on the embedded demo: CT, ST, ST++ and cheaper sub-network schedules.

    python benchmarks/efficiency.py [--variants ct st ...] [--seeds 0 1 2] [--output output/efficiency]
                                    [--report-dir DIR] [--smoke]

Each variant is a demo recipe plus `--stimulative KEY=VALUE` overrides (VARIANTS). Every run trains with
`python -m timm_st train` (seed 0 of every variant, then seed 1, ...: a drift of the machine hits all
variants alike), then one `python -m timm_st analyze --group VARIANT RUNS... --bn both --subnets all`
evaluates every sub-network of the recipes' space (728) with the full network's running BatchNorm
statistics (`running`) and with its own re-estimated ones (`recalibrate`). Per variant, mean +- std over
seeds: the time ratio (the run's sum of summary.csv's train_epoch_time over CT's of the same seed), the
FLOP ratio, full top-1, sub-network mean, spread (std over sub-networks), worst and loafing gap.

The FLOP ratio is computed, not timed: the expected FLOPs of a training step over CT's,
1 + num_subnets * E[sub-network forward FLOPs / full forward FLOPs] * ceil(f * B) / B * share of steps with
sub-networks (1 / subnet_interval, from start_epoch on), the expectation over the sampler's uniform draw of
the space's members and of the input side, every block counted per side by torch.utils.flop_counter
(timm-st's `relative_flops`). A backward costs about twice its forward in both passes, so this is the ratio
of training FLOPs; the KL loss and the resize are negligible.

Writes REPORT_DIR/efficiency.json (every figure, per seed too), efficiency.png (the cure against the cost)
and demo_accuracy_profile.png (CT and ST: sorted sub-network accuracy), and prints a Markdown table.
A finished run is reused only when its fingerprint (recipe text, overrides, seed, epochs, every timm_st
source file, torch and timm versions) equals the one recorded when it was trained; else it is retrained
with --overwrite. `--smoke` checks the plumbing in seconds (1 seed, 1 epoch, 2 variants, 3 sub-networks).
"""
import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO, DEMO_CT, DEMO_BN_UPDATE = 'recipes/demo_digits.yaml', 'recipes/demo_digits_ct.yaml', 'recipes/demo_digits_bn_update.yaml'
DEMO_LITE = 'recipes/demo_digits_lite.yaml'  # the recommended low-cost recipe: demo_digits.yaml with subnet_interval: 4
# ST++ in the demo's (default) space: KL-, 6 sub-networks on inputs of 43-100% of the side; coef 1/6 averages the six
# losses (the same total weight as ST's one sub-network); the authors' step sums them (coef 1: `stpp_sum`, not a default)
STPP = ['num_subnets=6', 'loss=kl_direction', 'input_scale=[0.43,1.0]']
# name -> (recipe, --stimulative overrides)
VARIANTS = {
    'ct': (DEMO_CT, []),
    'st': (DEMO, []),
    'st_bn_update': (DEMO_BN_UPDATE, []),
    'stpp': (DEMO, STPP + ['coef=0.1667']),
    'stpp_sum': (DEMO, STPP),
    'every2': (DEMO, ['subnet_interval=2']),
    'every3': (DEMO, ['subnet_interval=3']),
    'every4': (DEMO, ['subnet_interval=4']),
    'lite': (DEMO_LITE, []),
    'every4_bn_update': (DEMO_BN_UPDATE, ['subnet_interval=4']),
    'every3_coef3': (DEMO, ['subnet_interval=3', 'coef=3.0']),
    'every4_coef4': (DEMO, ['subnet_interval=4', 'coef=4.0']),
    'quarter': (DEMO, ['subnet_batch_fraction=0.25']),
    'third': (DEMO, ['subnet_batch_fraction=0.33']),
    'half': (DEMO, ['subnet_batch_fraction=0.5']),
    'from_epoch8': (DEMO, ['start_epoch=8']),
    'from_epoch10': (DEMO, ['start_epoch=10']),
    'from_epoch11': (DEMO, ['start_epoch=11']),
    'every2_half': (DEMO, ['subnet_interval=2', 'subnet_batch_fraction=0.5']),
}
# the four cheap variants spend the same extra compute (sub-networks on a quarter of the steps' images)
DEFAULT_VARIANTS = ['ct', 'st', 'st_bn_update', 'stpp', 'lite', 'every4_bn_update', 'quarter', 'every2_half',
                    'from_epoch11']
SMOKE_VARIANTS = ['ct', 'every4']
STATISTICS = ('full_top1', 'subnet_mean', 'subnet_std', 'subnet_min', 'loafing_gap')
TARGET_TIME, TARGET_GAIN = 1.15, 0.9  # issue 19: <= 1.15x CT's time and FLOPs, >= 90% of ST's gain in sub-network mean


def timm_st(*command):
    print('+ python -m timm_st ' + ' '.join(command), flush=True)
    subprocess.run([sys.executable, '-m', 'timm_st', *command], check=True, cwd=ROOT)


def fingerprint(recipe, overrides, seed, epochs):
    """What a run's result depends on: recipe text, overrides, seed, epochs, the package's code, torch and timm."""
    h = hashlib.sha256(json.dumps([(ROOT / recipe).read_text(), overrides, seed, epochs,
                                   version('torch'), version('timm')]).encode())
    for path in sorted((ROOT / 'timm_st').rglob('*.py')):
        h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def train(name, seed, args, prints):
    """Train one run (or reuse it when finished with the same fingerprint); its folder."""
    recipe, overrides = VARIANTS[name]
    folder, record = Path(args.output) / f'{name}-s{seed}', Path(args.output) / 'fingerprints.json'
    done = json.loads(record.read_text()) if record.is_file() else {}
    key = fingerprint(recipe, overrides, seed, args.epochs)
    if done.get(folder.name) == key and (folder / 'results.json').is_file():
        prints.append(f'{folder.name}: reused (same fingerprint)')
        return folder, True
    command = ['train', '-c', recipe, '--seed', str(seed), '--experiment', folder.name, '--output', args.output,
               '--eval-subnets', '0', '--overwrite']
    command += ['--epochs', str(args.epochs)] if args.epochs else []
    command += ['--stimulative', *overrides] if overrides else []
    timm_st(*command)
    done[folder.name] = key
    record.write_text(json.dumps(done, indent=1))
    return folder, False


def flop_ratio(folder):
    """Expected training FLOPs per step over CT's (module docstring), from the run's own resolved config."""
    import timm
    from timm_st import StimulativeConfig, SubnetPlan, subnet_stages
    from timm_st.analysis.evaluation import relative_flops, space_plans
    from timm_st.runs.folder import read_run
    run_args = read_run(folder).args
    config = StimulativeConfig.from_dict(run_args.get('stimulative'))
    if config.is_common_training:
        return 1.0
    side = run_args['img_size']
    model = timm.create_model(run_args['model'], num_classes=run_args['num_classes'])
    lo, hi = config.input_scale or (1.0, 1.0)
    sides = range(max(1, int(lo * side)), max(1, int(hi * side)) + 1)  # the sampler's uniform integer draw
    plans = [SubnetPlan(p.blocks, s if s != side else None) for p in space_plans(subnet_stages(model), config.sample_space)
             for s in sides]
    per_pass = sum(relative_flops(model, plans, (3, side, side))) / len(plans)
    batch = run_args['batch_size']
    epochs = run_args['epochs']
    share = (epochs - min(config.start_epoch, epochs)) / epochs / config.subnet_interval
    return 1.0 + config.num_subnets * per_pass * config.subnet_batch_size(batch) / batch * share


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return {'mean': None, 'std': None, 'n': 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {'mean': mean, 'std': std, 'n': len(values)}


def summarise(analysis, variants, folders, reused):
    """Per variant: per-seed figures and their mean +- std, the FLOP ratio and the target check."""
    from timm_st.runs.folder import read_run
    sources = {s['label']: s for s in analysis['sources']}
    times = {f.name: sum(t for t in read_run(f).column('train_epoch_time') if t is not None) for fs in folders.values()
             for f in fs}
    out = {}
    for name in variants:
        runs = folders[name]
        per_seed = [{'run': f.name, 'reused': reused[f.name], 'train_time': times[f.name],
                     'time_ratio': times[f.name] / times[f.name.replace(f'{name}-', 'ct-', 1)] if 'ct' in folders else None,
                     **{mode: sources[f.name]['statistics'][mode] for mode in analysis['bn_modes']}} for f in runs]
        out[name] = {'recipe': VARIANTS[name][0], 'overrides': VARIANTS[name][1], 'flop_ratio': flop_ratio(runs[0]),
                     'time_ratio': mean_std([r['time_ratio'] for r in per_seed]),
                     'train_time': mean_std([r['train_time'] for r in per_seed]),
                     **{mode: {k: mean_std([r[mode][k] for r in per_seed]) for k in STATISTICS}
                        for mode in analysis['bn_modes']},
                     'seeds': per_seed}
    if 'ct' in out and 'st' in out:
        ct, st = (out[n]['recalibrate'] for n in ('ct', 'st'))
        need = ct['subnet_mean']['mean'] + TARGET_GAIN * (st['subnet_mean']['mean'] - ct['subnet_mean']['mean'])
        floor = st['full_top1']['mean'] - (st['full_top1']['std'] or 0.0)
        for v in out.values():
            r = v['recalibrate']
            v['meets_target'] = bool(v['time_ratio']['mean'] <= TARGET_TIME and v['flop_ratio'] <= TARGET_TIME
                                     and r['subnet_mean']['mean'] >= need and r['full_top1']['mean'] >= floor)
        out['_target'] = {'max_time_and_flop_ratio': TARGET_TIME, 'min_subnet_mean': need, 'min_full_top1': floor,
                          'rule': f'>= CT + {TARGET_GAIN} x (ST - CT) in sub-network mean (recalibrate); full top-1 '
                                  f'mean >= ST mean - ST std'}
    return out


def fmt(stat, digits=2, unit=''):
    if stat['mean'] is None:
        return '-'
    return f'{stat["mean"]:.{digits}f}' + (f' +- {stat["std"]:.{digits}f}' if stat['std'] is not None else '') + unit


def table(summary, mode):
    lines = [f'| variant (BN {mode}) | time ratio | FLOP ratio | full top-1 | sub-networks, mean | spread (std) | worst | '
             f'loafing gap |', '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name, v in summary.items():
        if name.startswith('_'):
            continue
        s = v[mode]
        lines.append(f'| {name} | {fmt(v["time_ratio"])} | {v["flop_ratio"]:.2f} | {fmt(s["full_top1"], unit="%")} | '
                     f'{fmt(s["subnet_mean"], unit="%")} | {fmt(s["subnet_std"])} | {fmt(s["subnet_min"], unit="%")} | '
                     f'{fmt(s["loafing_gap"])} |')
    return '\n'.join(lines)


def plot(summary, modes, path):
    """Sub-network mean against the time ratio, one point per variant with seed error bars, per BN mode."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), squeeze=False)
    for mode, ax in zip(modes, axes[0]):
        for name, v in summary.items():
            if name.startswith('_') or v['time_ratio']['mean'] is None:
                continue
            x, y = v['time_ratio'], v[mode]['subnet_mean']
            ax.errorbar(x['mean'], y['mean'], xerr=x['std'] or 0, yerr=y['std'] or 0, fmt='o', capsize=3)
            ax.annotate(name, (x['mean'], y['mean']), textcoords='offset points', xytext=(5, 4), fontsize=8)
        if mode == 'recalibrate' and '_target' in summary:
            ax.axvline(TARGET_TIME, color='grey', linestyle=':', linewidth=1)
            ax.axhline(summary['_target']['min_subnet_mean'], color='grey', linestyle=':', linewidth=1)
        ax.set_xlabel("training time / CT's (sum of epoch times, same seed)")
        ax.set_ylabel('sub-network mean top-1 (%)')
        ax.set_title(f'cure vs cost, BN {mode} (mean +- std over seeds)')
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=None, help="override the recipes' epochs")
    parser.add_argument('--subnets', default='all', help='sub-networks evaluated: all, or a number drawn')
    parser.add_argument('--calib-images', type=int, default=512)
    parser.add_argument('--output', default='output/efficiency', help='runs and the analysis')
    parser.add_argument('--report-dir', default=None, help='efficiency.json and the PNGs (default: OUTPUT)')
    parser.add_argument('--smoke', action='store_true', help='1 seed, 1 epoch, 2 variants, 3 sub-networks')
    args = parser.parse_args()
    if args.smoke:
        args.variants, args.seeds, args.epochs, args.subnets = SMOKE_VARIANTS, [0], 1, '3'
    args.output = str(Path(args.output).resolve())
    report_dir = Path(args.report_dir or args.output).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    folders, reused, notes = {name: [] for name in args.variants}, {}, []
    for seed in args.seeds:
        for name in args.variants:
            folder, was_reused = train(name, seed, args, notes)
            folders[name].append(folder)
            reused[folder.name] = was_reused
    analysis_dir = Path(args.output) / 'analysis'
    groups = [x for name in args.variants for x in ('--group', name, *map(str, folders[name]))]
    timm_st('analyze', *groups, '--checkpoint', 'last', '--bn', 'both', '--subnets', args.subnets,
            '--calib-images', str(args.calib_images), '--output', str(analysis_dir))
    analysis = json.loads((analysis_dir / 'analysis.json').read_text())
    summary = summarise(analysis, args.variants, folders, reused)
    wall = time.time() - start
    result = {'command': ' '.join(['python', 'benchmarks/efficiency.py', *sys.argv[1:]]), 'wall_seconds': wall,
              'all_trained_in_this_invocation': not any(reused.values()), 'space': analysis['space'],
              'calibration': analysis['calibration'], 'seeds': args.seeds, 'variants': summary}
    (report_dir / 'efficiency.json').write_text(json.dumps(result, indent=1))
    plot(summary, analysis['bn_modes'], report_dir / 'efficiency.png')
    if {'ct', 'st'} <= set(args.variants):
        from timm_st.analysis.plots import plot_accuracy_profile
        keep = lambda items, key: [x for x in items if x[key] in ('ct', 'st')]
        plot_accuracy_profile({**analysis, 'sources': keep(analysis['sources'], 'group'),
                               'groups': keep(analysis['groups'], 'name')}, report_dir / 'demo_accuracy_profile.png')
    print('\n'.join(notes + [table(summary, mode) for mode in analysis['bn_modes']]))
    for name, v in summary.items():
        if 'meets_target' in v:
            print(f'{name}: {"meets" if v["meets_target"] else "misses"} the target')
    print(f'{len(reused)} runs ({sum(reused.values())} reused) and the analysis in {wall:.0f} s; '
          f'report: {report_dir / "efficiency.json"}')


if __name__ == '__main__':
    main()
