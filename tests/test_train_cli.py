"""`timm-st train` end to end on a tiny generated image folder (CPU)."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from timm_st.commands.train import main

BASE = [
    '--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8',
    '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--device', 'cpu',
    '--hflip', '0', '--color-jitter', '0', '--no-prefetcher', '--eval-subnets', '3', '--log-interval', '100',
]


def write_recipe(path, stimulative=None, **keys):
    import yaml
    recipe = dict(keys)
    if stimulative is not None:
        recipe['stimulative'] = stimulative
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(args):
    assert main([str(a) for a in args]) == 0


def summary_rows(out):
    with open(out / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('method', ['ct', 'st'])
def test_two_epochs_write_outputs(tmp_path, image_folder, method):
    recipe = write_recipe(tmp_path / 'r.yaml', {'num_subnets': 2, 'input_scale': [0.5, 1.0], 'recalibrate_bn': 8}
                          if method == 'st' else None)
    run(['-c', recipe, '--data-dir', image_folder, '--output', tmp_path, '--experiment', 'run'] + BASE)
    out = tmp_path / 'run'
    rows = summary_rows(out)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for key in ('train_loss', 'lr', 'eval_loss', 'eval_top1', 'eval_top5', 'train_epoch_time', 'train_img_per_sec'):
        assert float(rows[-1][key]) >= 0
    if method == 'st':
        assert float(rows[-1]['train_subnet_loss']) > 0
    else:
        assert 'train_subnet_loss' not in rows[-1]
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar', 'args.yaml'):
        assert (out / name).is_file(), name
    results = json.loads((out / 'results.json').read_text())
    assert results['method'] == {'ct': 'ct', 'st': 'stpp'}[method]  # from the settings: 2 sub-networks + input_scale is ST++
    assert results['full']['top1'] == pytest.approx(float(rows[-1]['eval_top1']))
    assert results['subnets']['count'] == 3 and len(results['subnets']['subnets']) == 3
    for bn in ('running', 'recalibrate'):
        stats = results['subnets'][bn]
        top1 = [e[bn]['top1'] for e in results['subnets']['subnets']]
        assert stats['top1_mean'] == pytest.approx(sum(top1) / 3)
        assert (stats['top1_min'], stats['top1_max']) == (min(top1), max(top1))
        assert stats['loafing_gap'] == pytest.approx(stats['full_top1'] - stats['top1_mean'])
    assert results['subnets']['running']['full_top1'] == pytest.approx(results['full']['top1'])
    assert results['class_names'] == ['class0', 'class1', 'class2']
    checkpoint = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert ('subnet_sampler' in checkpoint.get('task_state', {})) == (method == 'st')


def _sampler_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)['task_state']['subnet_sampler']['generator']


def test_resume_continues_epochs_and_subnet_sequence(tmp_path, image_folder):
    recipe = write_recipe(tmp_path / 'r.yaml', {'num_subnets': 2, 'input_scale': [0.5, 1.0], 'seed': 5})
    common = ['-c', recipe, '--data-dir', image_folder, '--output', tmp_path] + BASE + ['--epochs', '3']
    run(common + ['--experiment', 'full'])
    run(common + ['--experiment', 'first', '--epochs', '3', '--eval-subnets', '0'])
    # resume from the end of epoch 1 of an identical run
    run(common + ['--experiment', 'resumed', '--resume', tmp_path / 'first' / 'checkpoint-1.pth.tar'])
    assert [r['epoch'] for r in summary_rows(tmp_path / 'resumed')] == ['2']
    assert torch.equal(_sampler_state(tmp_path / 'first' / 'checkpoint-1.pth.tar'),
                       _sampler_state(tmp_path / 'full' / 'checkpoint-1.pth.tar'))
    # same draws in epoch 2 from the same state: the same sequence as the uninterrupted run
    assert torch.equal(_sampler_state(tmp_path / 'resumed' / 'last.pth.tar'),
                       _sampler_state(tmp_path / 'full' / 'last.pth.tar'))


def test_results_json_subnets_equal_timm_st_analyze_of_the_run(tmp_path):
    """results.json and `timm-st analyze` of the same run report the same sub-networks with the same
    accuracy (running statistics: no calibration images involved): they share the evaluation code. The run
    is trained on classes that overlap (30 validation images), so its sub-networks differ from its full network
    in loss and top-1: the compared numbers are not one constant, and evaluating one network for every plan,
    in that shared code, fails the test."""
    import numpy as np
    from PIL import Image
    from timm_st.commands.analyze import main as analyze_main
    rng, data = np.random.RandomState(0), tmp_path / 'images'
    for split, count in (('train', 8), ('validation', 10)):
        for label in range(3):
            (data / split / f'class{label}').mkdir(parents=True)
            for i in range(count):  # brightness ranges of the classes overlap
                pixels = (rng.randint(0, 120, (16, 16, 3)) + 40 * label).astype(np.uint8)
                Image.fromarray(pixels).save(data / split / f'class{label}' / f'{i}.png')
    recipe = write_recipe(tmp_path / 'r.yaml', {'num_subnets': 1, 'sample_space': {'max_drop': [2, 2, 2]}})
    # seed 0: a run whose sub-networks' top-1 differs from the full network's (the last check)
    run(['-c', recipe, '--data-dir', data, '--output', tmp_path, '--experiment', 'run', '--seed', '0'] + BASE)
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert analyze_main([str(tmp_path / 'run'), '--data-dir', str(data), '--checkpoint', 'last', '--subnets', '3',
                         '--bn', 'running', '--workers', '0', '--output', str(tmp_path / 'analysis')]) == 0
    analysis = json.loads((tmp_path / 'analysis' / 'analysis.json').read_text())
    entries = analysis['sources'][0]['subnets']
    assert entries[0]['depths'] == [3, 3, 3] and entries[0]['running']['top1'] == results['full']['top1']
    assert [e['depths'] for e in entries[1:]] == [e['depths'] for e in results['subnets']['subnets']]
    assert [e['running']['top1'] for e in entries[1:]] == [e['running']['top1'] for e in results['subnets']['subnets']]
    full = entries[0]['running']  # not trivially equal: every sub-network is a network of its own
    assert all(abs(e['running']['loss'] - full['loss']) > 1e-3 for e in entries[1:]), [e['running'] for e in entries]
    assert any(e['running']['top1'] != full['top1'] for e in results['subnets']['subnets']), results['subnets']

def test_resume_without_state_would_differ(tmp_path, image_folder):
    """The resume check above can fail: a fresh sampler ends elsewhere."""
    recipe = write_recipe(tmp_path / 'r.yaml', {'num_subnets': 2, 'seed': 5})
    common = ['-c', recipe, '--data-dir', image_folder, '--output', tmp_path] + BASE + ['--eval-subnets', '0']
    run(common + ['--experiment', 'a', '--epochs', '3'])
    run(common + ['--experiment', 'b', '--epochs', '3', '--start-epoch', '2'])
    assert not torch.equal(_sampler_state(tmp_path / 'a' / 'last.pth.tar'), _sampler_state(tmp_path / 'b' / 'last.pth.tar'))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('ddp', [True, False], ids=['ddp', 'control-without-ddp'])
def test_torchrun_two_processes_gloo(tmp_path, image_folder, ddp):
    """Two ranks under torchrun train one model: both end with bit-identical weights. The control removes DDP (ranks
    then train independently on their shards, and would pass a check of results.json alone): the ranks must differ."""
    recipe = write_recipe(tmp_path / 'r.yaml', {'num_subnets': 2, 'input_scale': [0.5, 1.0]})
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-port', str(_free_port()),
           '-m', 'timm_st', 'train', '-c', recipe, '--data-dir', str(image_folder), '--output', str(tmp_path),
           '--experiment', 'ddp', '--device-modules', 'ddp_probe'] + BASE
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS='1', TIMM_ST_TEST_WEIGHTS=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get('PYTHONPATH')])))
    if not ddp:
        env['TIMM_ST_TEST_NO_DDP'] = '1'
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    assert results['world_size'] == 2 and results['subnets']['count'] == 3
    assert [r['epoch'] for r in summary_rows(tmp_path / 'ddp')] == ['0', '1']
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    differ = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    if ddp:
        assert not differ, f'ranks disagree on {differ[:5]}'
    else:
        assert len(differ) > 10, 'without DDP the ranks must diverge, or the check above proves nothing'


@pytest.mark.parametrize('extra,message', [
    ([], 'no dataset given'),
    (['--num-classes', '5'], 'num_classes is 5 but the dataset has 3 classes'),
    (['--batch-size', 'eight'], 'invalid command line'),
    (['--aug-repeats', '3'], 'repeated augmentation needs a distributed run'),
    (['--eval-subnets', '-1'], 'eval_subnets must be >= 0'),
    (['--grad-accum-steps', '0'], 'grad_accum_steps must be >= 1'),
    (['--train-batch-sizes', '4'], 'train_batch_sizes needs train_img_sizes'),
])
def test_errors_exit_before_training(tmp_path, image_folder, capsys, extra, message):
    # refusals of the dataset stage and of options test_validation.py does not cover (it checks both routes)
    data = [] if any(a == '--data-dir' for a in extra) or not extra and message == 'no dataset given' else [
        '--data-dir', str(image_folder)]
    code = main(BASE + data + extra + ['--output', str(tmp_path / 'out'), '--experiment', 'x'])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('recipe,message', [
    ({'stimulative': {'loss': 'kl', 'amplitude': 2.0}}, 'stimulative.amplitude: only used with loss: kl_direction'),
    ({'stimulative': 'yes'}, 'stimulative: expected a mapping'),
])
def test_recipe_errors_exit_before_training(tmp_path, image_folder, capsys, recipe, message):
    path = tmp_path / 'bad.yaml'
    import yaml
    path.write_text(yaml.safe_dump(recipe))
    args = ['-c', str(path)] + BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path / 'out')]
    code = main(args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_unreadable_dataset(tmp_path, capsys):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    code = main(BASE + ['--data-dir', str(tmp_path / 'empty'), '--output', str(tmp_path / 'out')])
    assert code == 2
    assert 'cannot read dataset' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('recipe,message', [
    ({'task': 'mypkg:MyTask'}, "recipe key task: 'mypkg:MyTask'; timm-st train builds its own task"),
    ({'task_kwargs': {'num_subnets': 2}}, 'recipe key task_kwargs'),
])
def test_task_keys_of_patched_train_py(tmp_path, image_folder, capsys, recipe, message):
    import yaml
    path = tmp_path / 'r.yaml'
    path.write_text(yaml.safe_dump(recipe))
    assert main(['-c', str(path)] + BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path / 'o')]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# same numbers as timm's train.py

# timm's train.py (v1.0.27 and aa4b5850, "setup loss function"), written out by hand:
# (mixup/cutmix active, smoothing, bce_loss) -> (loss class, smoothing it applies)
TRAIN_PY_CRITERION = [
    (True, 0.3, True, 'BinaryCrossEntropy', 0.1),  # train.py passes no smoothing: BCE's own default (0.1)
    (True, 0.1, False, 'SoftTargetCrossEntropy', None),
    (False, 0.1, True, 'BinaryCrossEntropy', 0.1),
    (False, 0.1, False, 'LabelSmoothingCrossEntropy', 0.1),
    (False, 0.0, True, 'CrossEntropyLoss', None),  # bce_loss without mixup or smoothing: still cross-entropy
    (False, 0.0, False, 'CrossEntropyLoss', None),
]


@pytest.mark.parametrize('mixup,smoothing,bce,name,applied', TRAIN_PY_CRITERION)
def test_criterion_matches_train_py(mixup, smoothing, bce, name, applied):
    from timm_st.runs.build import train_criterion
    from timm_st.runs.recipe import parse_args
    mixup_args = ['--mixup', '0.2'] if mixup else []
    args, _ = parse_args(['--smoothing', str(smoothing)] + (['--bce-loss'] if bce else []) + mixup_args)
    criterion = train_criterion(args)
    assert type(criterion).__name__ == name
    if applied is not None:
        assert criterion.smoothing == applied


def test_best_checkpoint_by_ema_metric(tmp_path, image_folder, monkeypatch):
    """With EMA validated, model_best follows the EMA metric (as train.py); the plain metric would pick epoch 1."""
    import timm_st.runs.runner as runner_module
    plain = iter([10.0, 90.0, 20.0])
    ema = iter([70.0, 30.0, 50.0])
    calls = []

    def scripted(model, loader, device, **kwargs):
        calls.append(model)
        top1 = next(plain) if len(calls) % 2 else next(ema)
        return {'loss': 100.0 - top1, 'top1': top1, 'top5': 100.0}
    monkeypatch.setattr(runner_module, 'validate', scripted)
    run(['--data-dir', image_folder, '--output', tmp_path, '--experiment', 'ema'] + BASE
        + ['--epochs', '3', '--model-ema', '--eval-subnets', '0'])
    out = tmp_path / 'ema'
    checkpoint = torch.load(out / 'model_best.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['epoch'] == 0 and checkpoint['metric'] == 70.0
    rows = summary_rows(out)
    assert [float(r['eval_ema_top1']) for r in rows] == [70.0, 30.0, 50.0]
    assert [float(r['eval_top1']) for r in rows] == [10.0, 90.0, 20.0]
    results = json.loads((out / 'results.json').read_text())
    assert results['best_epoch'] == 0 and results['best_metric'] == 70.0


def test_lr_scaling_recorded_as_train_py(tmp_path, image_folder):
    base = [a for a in BASE]
    i = base.index('--lr')
    del base[i:i + 2]
    run(['--data-dir', image_folder, '--output', tmp_path, '--experiment', 'lr'] + base
        + ['--epochs', '1', '--lr-base', '0.4', '--opt', 'adamw', '--eval-subnets', '0'])
    import yaml
    args = yaml.safe_load((tmp_path / 'lr' / 'args.yaml').read_text())
    # train.py: lr = lr_base * sqrt(global batch / lr_base_size) for ada*/lamb optimizers, and it records the rule
    assert args['lr_base_scale'] == 'sqrt' and args['lr'] == pytest.approx(0.4 * (8 / 256) ** 0.5, rel=1e-12)


def _loader_takes_sizes():
    import inspect
    from timm.data import create_loader
    return 'input_size_choices' in inspect.signature(create_loader).parameters


@pytest.mark.skipif(not _loader_takes_sizes(), reason='train_img_sizes needs timm >= 1.0.29')
def test_lr_scaling_with_several_training_sizes_uses_the_average_batch(tmp_path, image_folder):
    """train.py (newest main): with train_img_sizes the reference batch is the policy-average batch size."""
    base = [a for a in BASE]
    i = base.index('--lr')
    del base[i:i + 2]
    run(['--data-dir', image_folder, '--output', tmp_path, '--experiment', 'sizes'] + base
        + ['--epochs', '1', '--lr-base', '0.4', '--eval-subnets', '0', '--train-img-sizes', '16', '12',
           '--train-batch-sizes', '8', '4'])
    import yaml
    args = yaml.safe_load((tmp_path / 'sizes' / 'args.yaml').read_text())
    assert args['lr_base_scale'] == 'linear' and args['lr'] == pytest.approx(0.4 * ((8 + 4) / 2) / 256, rel=1e-12)


def test_ema_batchnorm_reestimated_before_validation():
    """bn: update + recalibrate_bn: before validation the EMA model's BN statistics are re-estimated too, on the
    same images, exactly as a fresh equal-weight average over those batches."""
    import copy
    import timm
    from timm_st import StimulativeConfig, StimulativeTask
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=3)
    task = StimulativeTask(model, StimulativeConfig.from_dict({'bn': 'update', 'recalibrate_bn': 8}),
                           criterion=torch.nn.CrossEntropyLoss(), num_epochs=1, device='cpu')
    task.setup_ema(decay=0.5)
    ema = task.get_trainable_module(ema=True).module
    with torch.no_grad():  # make the EMA differ from the live model, so their statistics differ
        for p in ema.parameters():
            p.mul_(0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.zeros(4, dtype=torch.long)) for _ in range(3)]

    def reference(net):  # plain torch: reset stats, momentum None (cumulative average), two batches in train mode
        net = copy.deepcopy(net)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        net.train()
        with torch.no_grad():
            for x, _ in batches[:2]:
                net(x)
        return {k: v for k, v in net.state_dict().items() if 'running' in k}

    expected_live, expected_ema = reference(model), reference(ema)
    before = {k: v.clone() for k, v in ema.state_dict().items() if 'running' in k}
    task.set_epoch(0)
    assert task.before_validate(batches) == 8
    for name, value in expected_ema.items():
        assert torch.allclose(ema.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
    for name, value in expected_live.items():
        assert torch.allclose(model.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(before['bn1.running_mean'], expected_ema['bn1.running_mean'])
    assert not torch.allclose(expected_live['layer1.0.bn1.running_var'], expected_ema['layer1.0.bn1.running_var'])


def test_eval_on_train_labelled_everywhere(tmp_path, image_folder):
    run(['--data-dir', image_folder, '--output', tmp_path, '--experiment', 'tr'] + BASE
        + ['--epochs', '1', '--eval-subnets', '0', '--eval-on-train'])
    out = tmp_path / 'tr'
    assert [r['eval_split'] for r in summary_rows(out)] == ['train']
    results = json.loads((out / 'results.json').read_text())
    assert results['eval_on_train'] is True and results['eval_split'] == 'train'
    from timm_st.commands.publish import export_checkpoint
    card = (export_checkpoint(out, tmp_path / 'export') / 'README.md').read_text()
    assert '**the training data** (`train`, explicit `eval_on_train`: these numbers are not held-out accuracy)' in card
