"""Cost of evaluating every sub-network of a space: prefix tree vs one by one.

What runs
---------
`timm_st.analysis.evaluation.evaluate_plans` on every member of the `default` ordered space of
`resnet50` (216 sub-networks, the full network included; random init, seeded), over the same
fixed, seeded batches, four times:

* bn `running`     - method `tree`, then method `each` (one sub-network at a time, the model's own
  forward under `use_subnet`);
* bn `recalibrate` - the same two, each sub-network's BatchNorm statistics re-estimated on
  `--calib-batches` calibration batches before it is evaluated (tree: one tree pass per
  calibration batch accumulates every node's statistics).

What is measured
----------------
* time - wall time of each `evaluate_plans` call (CUDA synchronised), one call per row; the ratio
  is tree / each for the same BN mode. The calls run in the order of the table after one untimed
  warm-up call, so a load spike on a shared CPU hits one row: rerun when rows disagree with the
  block and FLOP ratios by much.
* block evaluations per batch - residual blocks run per batch through the tree (one per tree node)
  vs summed over the sub-networks one by one (`info` of `evaluate_plans`).
* FLOPs - `torch.utils.flop_counter.FlopCounterMode` around a whole `evaluate_plans` call on two
  images (one evaluation batch of two images, plus one calibration batch of two images for
  `recalibrate`), per image, everything included (the tree's check of its split against the model's own
  forward too); FLOPs scale linearly with the batch, so the ratio is the work ratio of the timed calls.
* identical - the tree's and the one-by-one top-1 / top-5 of every sub-network are equal and their
  losses agree to 1e-6 (relative); the script says so or fails.

Targets: tree time <= 0.25x one-by-one with `running`, <= 0.35x with `recalibrate`.

Reproduce (CPU defaults: 64 px, 2 batches of 8 images, 2 calibration batches; a few minutes on 2 cores)::

    python benchmarks/analyze_cost.py
    python benchmarks/analyze_cost.py --json analyze_cost_cpu.json

GPU (224 px, 4 batches of 64, 4 calibration batches)::

    python benchmarks/analyze_cost.py --device cuda --amp bf16 --channels-last
"""
import argparse
import contextlib
import json
import platform
import sys
import time
from typing import Any, Dict, List, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm_st import subnet_stages
from timm_st.analysis.evaluation import evaluate_plans, space_plans


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model', default='resnet50')
    p.add_argument('--space', default='default')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--img-size', type=int, default=None, help='default: 224 on cuda, 64 on cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 64 on cuda, 8 on cpu')
    p.add_argument('--batches', type=int, default=None, help='evaluation batches (default: 4 on cuda, 2 on cpu)')
    p.add_argument('--calib-batches', type=int, default=None,
                   help='calibration batches for bn recalibrate (default: 4 on cuda, 2 on cpu)')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results here')
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    for name, gpu, cpu in (('img_size', 224, 64), ('batch_size', 64, 8), ('batches', 4, 2), ('calib_batches', 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if min(args.batches, args.calib_batches, args.batch_size) < 1:
        p.error('--batches, --calib-batches and --batch-size must be >= 1')
    return args


def _batches(n: int, batch_size: int, size: int, classes: int, seed: int, device: torch.device) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch_size,), generator=g).to(device)) for _ in range(n)]


def compare_routes(results) -> List[Tuple[str, bool, float]]:
    """Per BN mode: do the tree and the one-by-one route give identical results, and the largest loss difference."""
    checks = []
    for bn in ('running', 'recalibrate'):
        tree, each = results[(bn, 'tree')], results[(bn, 'each')]
        same = all(t['top1'] == e['top1'] and t['top5'] == e['top5'] and abs(t['loss'] - e['loss']) <= 1e-6 * abs(e['loss'])
                   for t, e in zip(tree, each))
        max_diff = max(abs(t['loss'] - e['loss']) for t, e in zip(tree, each))
        checks.append((bn, same, max_diff))
        if not same:
            print(f'ERROR: bn {bn}: tree and one-by-one results differ (max loss difference {max_diff:.3g})')

    return checks


def table(rows: List[Dict[str, Any]]) -> Tuple[List[str], Dict[Tuple[str, str], Dict[str, Any]]]:
    """The Markdown table (each route against one by one, in time, block evaluations and FLOPs) and rows by key."""
    by_key = {(r['bn'], r['method']): r for r in rows}
    lines = ['| bn | method | time s | time ratio | block evals / batch | block ratio | GFLOPs / image | FLOP ratio |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        base = by_key[(r['bn'], 'each')]
        tree_info = by_key[(r['bn'], 'tree')]['info']
        blocks = tree_info['block_evaluations_per_batch' if r['method'] == 'tree' else 'block_evaluations_each_per_batch']
        r['time_ratio'] = r['seconds'] / base['seconds']
        r['flop_ratio'] = r['flops_per_image'] / base['flops_per_image']
        r['block_evaluations_per_batch'] = blocks
        r['block_ratio'] = blocks / tree_info['block_evaluations_each_per_batch']
        lines.append(f"| {r['bn']} | {r['method']} | {r['seconds']:.1f} | {r['time_ratio']:.3f} | {blocks} | "
                     f"{r['block_ratio']:.3f} | {r['flops_per_image'] / 1e9:.1f} | {r['flop_ratio']:.3f} |")
    return lines, by_key


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    plans = space_plans(subnet_stages(model), args.space)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    loader = _batches(args.batches, args.batch_size, args.img_size, args.num_classes, args.seed, device)
    calib = _batches(args.calib_batches, args.batch_size, args.img_size, args.num_classes, args.seed + 1, device)

    def evaluate(loader_, calib_, bn, method, info=None):
        return evaluate_plans(model, plans, loader_, device, bn=bn, method=method, calib_loader=calib_,
                              calib_images=sum(len(x) for x, _ in calib_), autocast=autocast,
                              channels_last=args.channels_last, info=info)

    evaluate(loader[:1], calib, 'running', 'tree')  # warm-up (allocator, kernels), untimed
    flop_images = min(2, args.batch_size)  # train-mode BN needs 2 values per channel when the last map is 1x1
    few = [(x[:flop_images], y[:flop_images]) for x, y in loader[:1]]
    few_calib = [(x[:flop_images], y[:flop_images]) for x, y in calib[:1]]
    rows, results = [], {}
    for bn in ('running', 'recalibrate'):
        for method in ('tree', 'each'):
            info = {}
            sync(device)
            t0 = time.perf_counter()
            metrics = evaluate(loader, calib, bn, method, info)
            sync(device)
            seconds = time.perf_counter() - t0
            counter = FlopCounterMode(display=False)
            with counter:
                evaluate(few, few_calib, bn, method)
            results[(bn, method)] = metrics
            rows.append({'bn': bn, 'method': method, 'seconds': seconds, 'flops_per_image': counter.get_total_flops() / flop_images,
                         'info': info})
    checks = compare_routes(results)
    lines, by_key = table(rows)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)')
    env = (f'device: {dev_name}; torch {torch.__version__}; timm {timm.__version__}; model {args.model}; '
           f'space {args.space} ({len(plans)} sub-networks incl. the full network); img {args.img_size}; '
           f'{args.batches} batches of {args.batch_size} (+{args.calib_batches} calibration batches for recalibrate); '
           f'amp {args.amp}; channels_last {args.channels_last}; seed {args.seed}')
    print('\n'.join(lines))
    print()
    print(env)
    print('identical results (top-1, top-5 equal; loss within 1e-6 relative): ' + '; '.join(
        f'{bn} {"yes" if same else "NO"} (max loss difference {diff:.2g})' for bn, same, diff in checks))
    targets = []
    for bn, target in (('running', 0.25), ('recalibrate', 0.35)):
        ratio = by_key[(bn, 'tree')]['time_ratio']
        targets.append(f"{bn}: tree time {ratio:.3f}x one-by-one ({'meets' if ratio <= target else 'MISSES'} "
                       f"<= {target})")
    print('targets: ' + ' | '.join(targets))

    report = {
        'settings': vars(args),
        'env': {'device': dev_name, 'torch': torch.__version__, 'timm': timm.__version__,
                'python': sys.version.split()[0], 'threads': torch.get_num_threads()},
        'rows': rows,
        'identical': {bn: same for bn, same, _ in checks},
        'table': '\n'.join(lines),
    }
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    if not all(same for _, same, _ in checks):
        sys.exit(1)
    return report


if __name__ == '__main__':
    main()
