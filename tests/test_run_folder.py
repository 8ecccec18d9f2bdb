"""The run-folder format: written by `timm-st train`, read by `read_run` (also for folders of timm's train.py)."""
import argparse
import csv

import pytest
import torch
import yaml

import timm
from timm_st.runs.build import build_model
from timm_st.runs.errors import RunError
from timm_st.runs.folder import holds_run, read_run, write_summary_row
from timm_st.commands.train import main

BASE = [
    '--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8',
    '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--device', 'cpu', '--hflip', '0',
    '--color-jitter', '0', '--no-prefetcher', '--eval-subnets', '0', '--log-interval', '100',
]


def test_summary_with_val_interval_has_one_header_and_a_row_per_epoch(tmp_path, image_folder):
    assert main(BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment', 'run',
                        '--epochs', '3', '--val-interval', '2']) == 0
    folder = tmp_path / 'run'
    lines = (folder / 'summary.csv').read_text().splitlines()
    assert lines[0].startswith('epoch,') and sum(line.startswith('epoch') for line in lines) == 1
    rows = list(csv.DictReader(lines))
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert rows[0]['eval_top1'] == '' and rows[0]['train_loss'] != ''  # epoch 0 not validated (interval 2)
    assert rows[1]['eval_top1'] != '' and rows[2]['eval_top1'] != ''  # epoch 1 by the interval, 2 is the last
    run = read_run(folder)
    assert run.written_by == 'timm-st train' and run.finished
    top1 = run.column('eval_top1')
    assert top1[0] is None and top1[1] == float(rows[1]['eval_top1']) and top1[2] == float(rows[2]['eval_top1'])
    assert run.column('epoch') == [0.0, 1.0, 2.0]
    assert run.column('no_such_column') is None


def test_write_summary_row_replaces_later_epochs_and_keeps_one_header(tmp_path):
    # a file as an older timm-st resume left it: a second header appended, epochs repeated
    (tmp_path / 'summary.csv').write_text('epoch,train_loss,lr\n0,1.0,0.1\n1,0.9,0.1\nepoch,train_loss,lr\n'
                                          '1,0.8,0.1\n2,0.7,0.1\n')
    write_summary_row(tmp_path, 1, {'train_loss': 0.5, 'lr': 0.05, 'eval_top1': 50.0})
    text = (tmp_path / 'summary.csv').read_text()
    assert text.splitlines() == ['epoch,train_loss,lr,eval_top1', '0,1.0,0.1,', '1,0.5,0.05,50.0']
    write_summary_row(tmp_path, 2, {'train_loss': 0.25, 'lr': 0.01})
    assert text.splitlines() + ['2,0.25,0.01,'] == (tmp_path / 'summary.csv').read_text().splitlines()


def _train_py_folder(root, ema):
    """A run folder as timm's train.py (through the hook) writes it: its own args.yaml and summary columns,
    checkpoints from CheckpointSaver (weights, epoch, args), no results.json."""
    folder = root / 'train_py_run'
    folder.mkdir()
    args = dict(model='resnet20_cifar', num_classes=3, in_chans=None, input_size=None, drop=0.0, drop_path=None,
                drop_block=None, gp=None, bn_momentum=None, bn_eps=None, model_kwargs={}, model_ema=ema,
                model_ema_force_cpu=False, epochs=2, eval_metric='top1', device_modules=['timm_st.commands.hook'],
                stimulative={'num_subnets': 1})
    (folder / 'args.yaml').write_text(yaml.safe_dump(args))
    (folder / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'
                                        '0,1.2,1.1,40.0,100.0,0.1\n1,1.0,0.9,60.0,100.0,0.05\n')
    import timm_st  # noqa: F401  (registers resnet20_cifar)
    torch.manual_seed(3)
    model = timm.create_model('resnet20_cifar', num_classes=3)
    state = {'epoch': 1, 'arch': 'resnet20_cifar', 'state_dict': model.state_dict(), 'version': 2,
             'args': argparse.Namespace(**args), 'metric': 60.0}
    if ema:
        state['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, folder / 'last.pth.tar')
    torch.save(state, folder / 'model_best.pth.tar')
    return folder, model


@pytest.mark.parametrize('ema', [False, True])
def test_reads_a_train_py_run_folder(tmp_path, ema):
    folder, model = _train_py_folder(tmp_path, ema)
    run = read_run(folder)
    assert run.written_by == 'train.py'
    assert run.results is None and not run.finished
    assert run.column('train_subnet_loss') is None  # train.py does not record it: absent, not guessed
    assert run.column('eval_top1') == [40.0, 60.0]
    # train.py records one set of eval columns: the EMA weights' when EMA is validated, else the plain ones
    assert run.eval_column('top1', ema=ema) == [40.0, 60.0]
    assert run.eval_column('top1', ema=not ema) is None
    weights = run.load_state_dict('best')
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    rebuilt = run.build_model('last')
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
    if ema:
        assert torch.equal(run.load_state_dict('last', ema=True)['fc.weight'], model.fc.weight + 1)
    else:
        with pytest.raises(RunError, match='holds no EMA weights'):
            run.load_state_dict('last', ema=True)


def test_missing_and_foreign_folders(tmp_path):
    assert not holds_run(tmp_path / 'none') and not holds_run(tmp_path)
    with pytest.raises(RunError, match='does not exist'):
        read_run(tmp_path / 'none')
    (tmp_path / 'other.txt').write_text('x')
    with pytest.raises(RunError, match='holds no training run'):
        read_run(tmp_path)
    (tmp_path / 'checkpoint-3.pth.tar').write_bytes(b'')
    assert holds_run(tmp_path)


def test_checkpoint_errors_name_the_fix(tmp_path):
    folder, _ = _train_py_folder(tmp_path, ema=False)
    run = read_run(folder)
    with pytest.raises(RunError, match=r"no checkpoint .*checkpoint-9.pth.tar.*checkpoints there: "
                                             r"\['last.pth.tar', 'model_best.pth.tar'\]"):
        run.checkpoint_path('checkpoint-9.pth.tar')
    state = torch.load(folder / 'last.pth.tar', weights_only=False)
    state['state_dict']['fc.weight'][0, 0] = float('nan')
    torch.save(state, folder / 'last.pth.tar')
    with pytest.raises(RunError, match="'fc.weight' holds NaN or inf"):
        run.load_state_dict('last')


def test_build_model_follows_the_run_arguments():
    import timm_st  # noqa: F401
    model = build_model({'model': 'resnet20_cifar', 'num_classes': 5, 'input_size': [1, 16, 16], 'drop': 0.25})
    assert model.num_classes == 5 and next(model.parameters()).shape[1] == 1  # in_chans from input_size, as train.py
    with pytest.raises(RunError, match="model 'resnet51' of this run is not a timm model"):
        build_model({'model': 'resnet51'})
    with pytest.raises(RunError, match='do not fit'):
        build_model({'model': 'resnet20_cifar', 'num_classes': 3}, state_dict=model.state_dict())
