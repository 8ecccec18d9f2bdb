"""benchmarks/efficiency.py's plumbing, in seconds (`--smoke`: CT and one cheap schedule, 1 seed, 1 epoch,
3 sub-networks): the runs train, `timm-st analyze` measures them, the report holds per-variant figures taken
from the analysis and the runs' summary.csv, a FLOP ratio that matches a hand count, and the plots; a second
invocation reuses a finished run only when its recorded fingerprint matches, and a different recipe, override, seed
or epoch count never matches."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'benchmarks' / 'efficiency.py'


def load_script():
    spec = importlib.util.spec_from_file_location('efficiency', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_subnet_flops(side=16):
    """E[forward FLOPs of a sampled sub-network] / full forward FLOPs for resnet56_cifar in the default ordered
    space, counted by hand: 2 * multiply-adds of every convolution and linear layer (from their output shapes),
    and a uniform number d in 0..8 of tail blocks dropped per stage, so block b (from 0) is dropped with
    probability b / 9."""
    model = timm.create_model('resnet56_cifar', num_classes=10).eval()
    costs, handles = {}, []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            costs[module] = 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            costs[module] = 2 * output.numel() * module.in_features

    for m in model.modules():
        handles.append(m.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    full = sum(costs.values())
    skipped = 0.0
    for stage in model.stages:
        for b, block in enumerate(stage):
            skipped += b / 9 * sum(costs.get(m, 0) for m in block.modules())
    return 1 - skipped / full


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('efficiency')
    command = [sys.executable, str(SCRIPT), '--smoke', '--output', str(out / 'runs'), '--report-dir', str(out)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / 'efficiency.json').read_text())
    record = out / 'runs' / 'fingerprints.json'  # as if ct-s0 had been trained by other code or another recipe
    record.write_text(json.dumps({**json.loads(record.read_text()), 'ct-s0': 'stale'}))
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first.stdout, report, second.stdout, json.loads((out / 'efficiency.json').read_text())


def test_smoke_report_holds_the_analysis_and_summary_figures(smoke):
    out, stdout, first, _, report = smoke  # the files on disk are the second invocation's
    assert first['all_trained_in_this_invocation'] and first['seeds'] == [0]
    variants = report['variants']
    assert list(variants) == ['ct', 'every4']  # no ST in the smoke set: no target check
    analysis = json.loads((out / 'runs' / 'analysis' / 'analysis.json').read_text())
    assert analysis['space']['evaluated'] == '3 drawn with seed 0'
    sources = {s['label']: s for s in analysis['sources']}
    from timm_st.runs.folder import read_run
    for name, v in variants.items():
        (seed,) = v['seeds']
        run = read_run(out / 'runs' / f'{name}-s0')
        assert seed['train_time'] == pytest.approx(sum(run.column('train_epoch_time'))) and seed['train_time'] > 0
        for mode in ('running', 'recalibrate'):
            for key in ('full_top1', 'subnet_mean', 'subnet_std', 'subnet_min', 'loafing_gap'):
                assert v[mode][key]['mean'] == sources[f'{name}-s0']['statistics'][mode][key]
                assert v[mode][key]['std'] is None  # one seed
    assert variants['ct']['time_ratio']['mean'] == 1.0
    assert variants['every4']['time_ratio']['mean'] == pytest.approx(
        variants['every4']['train_time']['mean'] / variants['ct']['train_time']['mean'])
    assert '| every4 |' in stdout and '| variant (BN recalibrate) |' in stdout
    assert (out / 'efficiency.png').stat().st_size > 10_000
    assert not (out / 'demo_accuracy_profile.png').exists()  # drawn only with CT and ST


def test_flop_ratio_matches_a_hand_count(smoke):
    variants = smoke[2]['variants']
    assert variants['ct']['flop_ratio'] == 1.0
    # one sub-network at the full side on every 4th step of the (one-epoch) run
    assert variants['every4']['flop_ratio'] == pytest.approx(1 + expected_subnet_flops() / 4, rel=1e-3)


def test_second_invocation_reuses_only_runs_with_the_same_fingerprint(smoke):
    _, _, _, stdout, report = smoke
    assert 'every4-s0: reused (same fingerprint)' in stdout and 'ct-s0: reused' not in stdout
    assert '--experiment ct-s0' in stdout and '--experiment every4-s0' not in stdout
    assert not report['all_trained_in_this_invocation']
    assert [s['reused'] for v in report['variants'].values() for s in v['seeds']] == [False, True]


def test_fingerprint_changes_with_what_a_run_depends_on():
    efficiency = load_script()
    base = efficiency.fingerprint('recipes/demo_digits.yaml', [], 0, None)
    assert base == efficiency.fingerprint('recipes/demo_digits.yaml', [], 0, None)
    others = {efficiency.fingerprint('recipes/demo_digits_ct.yaml', [], 0, None),
              efficiency.fingerprint('recipes/demo_digits.yaml', ['subnet_interval=4'], 0, None),
              efficiency.fingerprint('recipes/demo_digits.yaml', [], 1, None),
              efficiency.fingerprint('recipes/demo_digits.yaml', [], 0, 1)}
    assert base not in others and len(others) == 4
