"""`timm-st analyze`: every SOURCE kind, one shared set of sub-networks, plots, bad input, groups over seeds.

Where accuracy is compared the model is trained a few steps (`_trained_model`): its full network is right on
most validation images and its sub-networks differ from it and from each other, so evaluating the wrong
network, the wrong preprocessing or the wrong shard shows in the numbers."""
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from timm_st import SubnetPlan
from timm_st.analysis import measure
from timm_st.analysis.evaluation import subnet_statistics
from timm_st.analysis.measure import shard_bounds
from timm_st.analysis.report import group_statistics
from timm_st.commands.cli import main as cli_main
from timm_st.runs.data import fixed_subset
from timm_st.runs.folder import write_args, write_summary_row
from timm_st.runs.publish import export_checkpoint

from conftest import subnet_forward, write_image_folder

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# what a run of either runner records about the model and its evaluation preprocessing
RUN_ARGS = dict(model='resnet18', num_classes=3, img_size=16, crop_pct=1.0, interpolation='bilinear',
                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], dataset='', val_split='validation',
                train_split='train', batch_size=8, workers=0, stimulative={'sample_space': {'max_drop': [1, 0, 1, 1]}})
RUN_DATA_CONFIG = {'input_size': [3, 16, 16], 'interpolation': 'bilinear', 'mean': [0.5] * 3, 'std': [0.25] * 3,
                   'crop_pct': 1.0, 'crop_mode': 'center'}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_model(seed=0, num_classes=3):
    """resnet18 with every residual branch active and random BatchNorm statistics (where accuracy is not compared)."""
    torch.manual_seed(seed)
    model = timm.create_model('resnet18', num_classes=num_classes, zero_init_last=False).eval()
    with torch.no_grad():  # non-trivial running statistics, so BN modes differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _images(root, split):
    """A split of the image folder decoded without timm: PIL -> [0, 1] -> (x - 0.5) / 0.25 (the runs' config)."""
    images, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in (root / split).iterdir())):
        for path in sorted((root / split / cls).iterdir()):
            pixels = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32) / 255.0
            images.append((torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.25)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def _trained_model(root, seed=0, steps=6):
    """`_random_model` trained `steps` full-batch SGD steps on the training split, its BatchNorm statistics then the
    split's exact averages: a full network right on most validation images, sub-networks that loaf."""
    torch.manual_seed(seed)
    model = timm.create_model('resnet18', num_classes=3, zero_init_last=False).train()
    x, y = _images(root, 'train')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model(x)
    return model.eval()


def _timm_st_run(folder, model, epochs=2, **overrides):
    """A run folder as `timm-st train` writes it (through its writers)."""
    import argparse
    folder.mkdir(parents=True)
    write_args(folder, argparse.Namespace(**{**RUN_ARGS, **overrides}))
    torch.save({'epoch': epochs - 1, 'arch': 'resnet18', 'state_dict': model.state_dict()}, folder / 'model_best.pth.tar')
    for epoch in range(epochs):
        write_summary_row(folder, epoch, {'train_loss': 1.0, 'train_epoch_time': 2.0 + epoch,
                                          'train_img_per_sec': 100.0 * (epoch + 1), 'eval_top1': 30.0 + 10 * epoch,
                                          'eval_top5': 100.0})
    return folder


def _train_py_run(folder, model):
    """A run folder as timm's train.py writes it: its own args.yaml and summary.csv columns, no results.json."""
    folder.mkdir(parents=True)
    (folder / 'args.yaml').write_text(yaml.safe_dump({**RUN_ARGS, 'data_dir': None, 'epochs': 1}))
    torch.save({'epoch': 0, 'arch': 'resnet18', 'state_dict': model.state_dict()}, folder / 'model_best.pth.tar')
    (folder / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,1.0,1.0,40.0,100.0,0.1\n')
    return folder


def _reference(model, x, y, depths):
    """(top-1 in %, mean cross-entropy) of the sub-network keeping `depths` blocks per stage, built by hand."""
    with torch.no_grad():
        logits = subnet_forward(model.eval(), SubnetPlan.prefix(tuple(depths)), x).float()
    return 100.0 * (logits.argmax(-1) == y).double().mean().item(), F.cross_entropy(logits, y).item()


def _assert_subnets_loaf(entries, mode='running'):
    """The compared numbers are not trivially equal: every sub-network's loss differs from the full network's, the
    sub-networks' losses differ from each other, and some sub-network's top-1 differs from the full network's."""
    full, subs = entries[0][mode], [e[mode] for e in entries[1:]]
    assert all(abs(s['loss'] - full['loss']) > 1e-3 for s in subs), [e[mode]['loss'] for e in entries]
    assert len({round(s['loss'], 6) for s in subs}) == len(subs)
    assert any(s['top1'] != full['top1'] for s in subs), [e[mode]['top1'] for e in entries]


def _run(argv):
    return cli_main(['analyze'] + [str(a) for a in argv])


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if anything is evaluated."""
    def refuse(*args, **kwargs):
        raise AssertionError('an evaluation started before the input was checked')
    monkeypatch.setattr(measure, 'evaluate_plans', refuse)
    monkeypatch.setattr(measure, 'lesion_study', refuse)


def test_every_source_kind_evaluated_on_the_same_subnetworks(tmp_path, image_folder):
    """One trained model through four routes: a timm-st run folder, a train.py run folder, a checkpoint file and
    the `timm-st publish` export of the run (local-dir:). The same sub-networks for all; the two run folders and
    the export with the run's preprocessing, so the same numbers, equal to a hand-built reference; the bare
    checkpoint (no preprocessing of its own) as timm's validate.py resolves its architecture."""
    model = _trained_model(image_folder)
    st_run = _timm_st_run(tmp_path / 'st-run', model)
    py_run = _train_py_run(tmp_path / 'train-py-run', model)
    checkpoint = tmp_path / 'weights.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    published = export_checkpoint(py_run, tmp_path / 'published')
    out = tmp_path / 'out'
    assert _run([st_run, py_run, checkpoint, f'local-dir:{published}', '--model', 'resnet18', '--data-dir',
                 image_folder, '--output', out]) == 0
    analysis = json.loads((out / 'analysis.json').read_text())
    kinds = [s['kind'] for s in analysis['sources']]
    assert kinds == ['run folder (timm-st train)', 'run folder (train.py)', 'checkpoint', 'hub']
    assert analysis['command'].startswith('timm-st analyze ')
    # the space came from the first run's recipe; every member evaluated, the same ones for every source
    assert analysis['space']['spec'] == {'max_drop': [1, 0, 1, 1]} and analysis['space']['members'] == 8
    depths = [[e['depths'] for e in s['subnets']] for s in analysis['sources']]
    assert all(d == depths[0] for d in depths)
    assert sorted(map(tuple, depths[0])) == sorted(
        (2 - a, 2, 2 - c, 2 - d) for a in (0, 1) for c in (0, 1) for d in (0, 1))
    run, train_py, bare, export = analysis['sources']
    x, y = _images(image_folder, 'validation')
    _assert_subnets_loaf(run['subnets'])
    for source in (run, train_py, export):  # the run's preprocessing: the same numbers, and the right ones
        assert source['data_config'] == RUN_DATA_CONFIG, source['kind']
        for entry, first in zip(source['subnets'], run['subnets']):
            assert entry['running']['loss'] == pytest.approx(first['running']['loss'], rel=1e-6, abs=1e-7)
            assert entry['running']['top1'] == first['running']['top1']
            top1, loss = _reference(model, x, y, entry['depths'])
            assert entry['running']['top1'] == pytest.approx(top1) and entry['running']['loss'] == pytest.approx(
                loss, rel=1e-5, abs=1e-6), (source['kind'], entry['depths'])
    # a bare checkpoint carries no preprocessing: its architecture's default, with the test size (validate.py)
    from timm.data import create_transform, resolve_data_config
    expected = resolve_data_config({}, model=timm.create_model('resnet18', num_classes=3), use_test_size=True)
    assert bare['data_config'] == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    transform = create_transform(**expected, is_training=False)
    bare_x = torch.stack([transform(Image.open(p).convert('RGB')) for c in sorted((image_folder / 'validation').iterdir())
                          for p in sorted(c.iterdir())])
    for entry in bare['subnets'][:3]:
        top1, loss = _reference(model, bare_x, y, entry['depths'])
        assert entry['running']['top1'] == pytest.approx(top1)
        assert entry['running']['loss'] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert bare['subnets'][0]['running']['loss'] != pytest.approx(run['subnets'][0]['running']['loss'], rel=1e-3)


def test_outputs_plots_lesions_and_curves(tmp_path, image_folder, capsys):
    runs = [_timm_st_run(tmp_path / f'run{i}', _random_model(i)) for i in range(2)]
    out = tmp_path / 'out'
    assert _run([*runs, '--data-dir', image_folder, '--output', out, '--bn', 'both', '--calib-images', '10',
                 '--lesion', '--subnets', '3']) == 0
    for name in ('top1_vs_flops.png', 'accuracy_profile.png', 'lesions.png', 'training_curves.png'):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100
    analysis = json.loads((out / 'analysis.json').read_text())
    assert analysis['bn_modes'] == ['running', 'recalibrate']
    assert analysis['space']['evaluated'] == '3 drawn with seed 0'
    rows = (out / 'subnets.csv').read_text().splitlines()
    assert len(rows) == 1 + 2 * 4  # header, then the full network and 3 sub-networks per source
    for s in analysis['sources']:
        assert s['lesion'] is not None
        assert s['cost'] == {'epochs': 2, 'img_per_sec': 150.0, 'train_time': 5.0}
        full = s['subnets'][0]
        assert full['full'] and full['relative_flops'] == pytest.approx(1.0)
        assert all(e['relative_flops'] < 1.0 for e in s['subnets'][1:])
    table = capsys.readouterr().out
    assert 'loafing gap' in table and 'recalibrate' in table


def test_group_statistics_against_an_independent_computation():
    members = [dict(full_top1=90.0, subnet_mean=70.0), dict(full_top1=94.0, subnet_mean=80.5),
               dict(full_top1=91.0, subnet_mean=60.25)]
    got = group_statistics(members)
    for key in ('full_top1', 'subnet_mean'):
        values = np.array([m[key] for m in members])
        assert got[key]['mean'] == pytest.approx(values.mean(), abs=1e-12)
        assert got[key]['std'] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert got[key]['n'] == 3
    single = group_statistics(members[:1])
    assert single['full_top1'] == {'mean': 90.0, 'std': None, 'n': 1}
    assert group_statistics([dict(a=1.0), dict(a=None)])['a']['mean'] is None


def test_subnet_statistics_against_an_independent_computation():
    values = [50.0, 75.5, 80.25, 60.0]
    got = subnet_statistics(90.0, values)
    arr = np.array(values)
    assert got['subnet_mean'] == pytest.approx(arr.mean(), abs=1e-12)
    assert got['subnet_std'] == pytest.approx(arr.std(), abs=1e-12)
    assert (got['subnet_min'], got['subnet_max']) == (50.0, 80.25)
    assert got['loafing_gap'] == pytest.approx(90.0 - arr.mean(), abs=1e-12)


def test_groups_report_mean_and_std_over_seeds(tmp_path, image_folder, capsys):
    ct = [_timm_st_run(tmp_path / f'ct{i}', _trained_model(image_folder, i)) for i in range(2)]
    st = [_timm_st_run(tmp_path / f'st{i}', _trained_model(image_folder, 10 + i, steps=4)) for i in range(3)]
    out = tmp_path / 'out'
    assert _run(['--group', 'ct', *ct, '--group', 'st', *st, '--data-dir', image_folder, '--output', out,
                 '--subnets', '4']) == 0
    analysis = json.loads((out / 'analysis.json').read_text())
    assert [(g['name'], len(g['members'])) for g in analysis['groups']] == [('ct', 2), ('st', 3)]
    for group in analysis['groups']:
        members = [s for s in analysis['sources'] if s['group'] == group['name']]
        for key in ('full_top1', 'subnet_mean', 'subnet_std', 'loafing_gap'):
            per_seed = []
            for s in members:  # recomputed from the per-sub-network accuracies
                top1 = [e['running']['top1'] for e in s['subnets']]
                subs = np.array(top1[1:])
                per_seed.append({'full_top1': top1[0], 'subnet_mean': subs.mean(), 'subnet_std': subs.std(),
                                 'loafing_gap': top1[0] - subs.mean()}[key])
            stat = group['statistics']['running'][key]
            assert stat['mean'] == pytest.approx(statistics.fmean(per_seed), abs=1e-9)
            assert stat['std'] == pytest.approx(statistics.stdev(per_seed), abs=1e-9)
            assert key == 'full_top1' or stat['std'] > 0.1  # the seeds differ: the std is not trivially zero
    table = capsys.readouterr().out
    ct_full = analysis['groups'][0]['statistics']['running']['full_top1']
    assert f'{ct_full["mean"]:.2f} +- {ct_full["std"]:.2f}' in table


@pytest.mark.parametrize('count,world', [(0, 2), (1, 2), (7, 2), (216, 3), (5, 8)])
def test_shards_cover_every_plan_once_in_order(count, world):
    shares = [list(range(*shard_bounds(count, rank, world))) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_calibration_images_are_a_fixed_spread_subset():
    first = fixed_subset(100, 30, seed=0)
    assert first == fixed_subset(100, 30, seed=0)
    assert len(set(first)) == 30 and first != list(range(30))
    assert fixed_subset(10, 30, seed=0) == list(range(10))


@pytest.mark.parametrize('case,expected', [
    ('missing data', "cannot read split 'validation'"),
    ('classes', 'predicts 5 classes'),
    ('space', "space 'space3' is written for stage depths [3, 4, 6, 3]"),
    ('no adapter', 'No sub-network adapter for model class ByobNet'),
    ('no train split', '--bn recalibrate needs training images'),
    ('unreadable checkpoint', 'cannot be read'),
    ('model name without --pretrained', 'add --pretrained'),
    ('calibration images', '--calib-images 0: give a positive number'),
    ('subnets', "--subnets 'many': give \"all\" or a positive number"),
    ('max samples', '--max-samples 0: give a positive number'),
    ('checkpoint without --model', 'name its architecture with --model NAME'),
    ('missing published model', "cannot load the model 'local-dir:"),
    ('output inside a file', 'is a file, not a folder'),
])
def test_bad_input_fails_before_any_evaluation(case, expected, tmp_path, image_folder, capsys, no_evaluation):
    run = _timm_st_run(tmp_path / 'run', _random_model())
    argv = [run, '--data-dir', image_folder, '--output', tmp_path / 'out']
    if case == 'missing data':
        argv = [run, '--data-dir', tmp_path / 'nowhere']
    elif case == 'classes':
        argv[0] = _timm_st_run(tmp_path / 'run5', _random_model(num_classes=5), num_classes=5)
    elif case == 'space':
        argv += ['--space', 'space3']
    elif case == 'no adapter':
        path = tmp_path / 'byob.pth'
        torch.manual_seed(0)
        torch.save({'state_dict': timm.create_model('test_byobnet', num_classes=3).state_dict()}, path)
        argv[0:1] = [path, '--model', 'test_byobnet']
    elif case == 'no train split':
        folder = tmp_path / 'val-only'
        write_image_folder(folder)
        import shutil
        shutil.rmtree(folder / 'train')
        argv = [run, '--data-dir', folder, '--bn', 'recalibrate']
    elif case == 'unreadable checkpoint':
        path = tmp_path / 'garbage.pth'
        path.write_bytes(b'not a checkpoint')
        argv[0:1] = [path, '--model', 'resnet18']
    elif case == 'calibration images':
        argv += ['--bn', 'recalibrate', '--calib-images', '0']
    elif case == 'subnets':
        argv += ['--subnets', 'many']
    elif case == 'max samples':
        argv += ['--max-samples', '0']
    elif case == 'checkpoint without --model':
        path = tmp_path / 'weights.pth'
        torch.save({'state_dict': _random_model().state_dict()}, path)
        argv[0] = path
    elif case == 'missing published model':
        argv[0] = f'local-dir:{tmp_path / "nowhere"}'
    elif case == 'output inside a file':
        (tmp_path / 'a_file').write_text('mine')
        argv[-1] = tmp_path / 'a_file' / 'out'
    else:
        argv[0] = 'resnet18'
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('timm-st analyze: error: ') and expected in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # about 12 s (two interpreters); the split itself is covered by test_shards_cover_every_plan_once_in_order
def test_two_ranks_split_the_subnetworks_and_rank0_reports_them_all(tmp_path, image_folder):
    """torchrun with 2 gloo CPU ranks: the same analysis as one process, every sub-network evaluated once."""
    import os
    import subprocess
    import sys
    run = _timm_st_run(tmp_path / 'run', _trained_model(image_folder))
    common = [str(run), '--data-dir', str(image_folder), '--device', 'cpu']
    assert _run(common + ['--output', tmp_path / 'single']) == 0
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    done = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
         '-m', 'timm_st', 'analyze', *common, '--output', str(tmp_path / 'ranks')],
        env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / 'single' / 'analysis.json').read_text())['sources'][0]['subnets']
    ranks = json.loads((tmp_path / 'ranks' / 'analysis.json').read_text())['sources'][0]['subnets']
    _assert_subnets_loaf(single)  # every sub-network has numbers of its own: a shard out of place would show
    assert len(ranks) == len(single) == 8
    for got, want in zip(ranks, single):
        assert got['depths'] == want['depths'] and got['running']['samples'] == want['running']['samples']
        assert got['running']['top1'] == want['running']['top1']
        assert got['running']['loss'] == pytest.approx(want['running']['loss'], rel=1e-6)


def test_recalibration_is_reproducible_and_its_images_are_stated(tmp_path, image_folder):
    """Augmented calibration batches are seeded: the same command gives the same numbers."""
    run = _timm_st_run(tmp_path / 'run', _random_model(), scale=[0.5, 1.0], hflip=0.5)
    results = []
    for name in ('a', 'b'):
        assert _run([run, '--data-dir', image_folder, '--output', tmp_path / name, '--bn', 'recalibrate',
                     '--calib-images', '20', '--batch-size', '8', '--subnets', '3', '--max-samples', '9']) == 0
        results.append(json.loads((tmp_path / name / 'analysis.json').read_text()))
    assert results[0]['sources'][0]['subnets'] == results[1]['sources'][0]['subnets']
    assert results[0]['calibration']['images'] == 16  # 20 of the 24 training images, in whole batches of 8
    assert all(e['recalibrate']['samples'] == 9 for e in results[0]['sources'][0]['subnets'])


def _subprocess(code_or_module, args, **kwargs):
    """A fresh interpreter (its own console logging) with this repository first on the path; stderr a pipe."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, *code_or_module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, **kwargs)


def test_progress_is_logged_off_a_terminal(tmp_path, image_folder):
    """With stderr not a terminal (a log file, a job scheduler) the progress bar gives way to log lines: one when
    each source and BatchNorm mode starts, then every tenth of it, up to 100%."""
    run = _timm_st_run(tmp_path / 'run', _random_model())
    proc = _subprocess(['-m', 'timm_st', 'analyze'], [run, '--data-dir', image_folder, '--output', tmp_path / 'out',
                                                      '--bn', 'both', '--calib-images', '8', '--device', 'cpu'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    for mode in ('running', 'recalibrate'):
        stage = [i for i, line in enumerate(lines) if f'Evaluating run [BN {mode}]: ' in line]
        assert len(stage) == 1, proc.stderr
        done = [line for line in lines[stage[0] + 1:] if line.startswith(f'run [BN {mode}] [')]
        assert len(done) >= 2 and done[-1].endswith('100%'), proc.stderr
    assert 'Space: ' in proc.stdout and 'it/s' not in proc.stderr  # the table on stdout; no bar


HUB_WARNING = "'[Errno 111] Connection refused' thrown while requesting HEAD (simulated) Retrying in 1s [Retry 1/5]."
UNREACHABLE_HUB = '''
import logging, sys
import timm
def unreachable(name, pretrained=False, **kwargs):  # what huggingface_hub logs while it retries, then its error
    logging.getLogger('huggingface_hub.utils._http').warning(sys.argv[1])
    raise OSError('cannot reach the hub (simulated)')
timm.create_model = unreachable
from timm_st.commands.analyze import main
sys.exit(main(sys.argv[2:]))
'''


def test_hub_warnings_printed_once(tmp_path, image_folder):
    """An unreachable hf-hub: model: each of huggingface_hub's retry warnings is printed once (not also through the
    root handler), then one error line and exit code 2."""
    proc = _subprocess(['-c', UNREACHABLE_HUB], [HUB_WARNING, 'hf-hub:org/model', '--data-dir', image_folder,
                                                  '--output', tmp_path / 'out'])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count('Connection refused') == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("timm-st analyze: error: cannot load the model 'hf-hub:")
