"""The thin commands over the run layer: `timm-st train --check`, exit code 2 with one line for bad input on every
command, the hook's earlier module path, TensorBoard logging, and a quiet console."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import timm_st.runs.runner as runner_module
from test_hook import FAKE_TRAIN_PY
from timm_st.commands.analyze import main as analyze_main
from timm_st.commands.cli import main as cli_main
from timm_st.commands.publish import main as publish_main
from timm_st.commands.train import main as train_main

BASE = ['--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8', '--epochs', '1',
        '--warmup-epochs', '0', '--lr', '0.05', '--workers', '0', '--device', 'cpu', '--no-prefetcher',
        '--eval-subnets', '0']
REPO = Path(__file__).resolve().parents[1]


def files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


def one_error_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f'timm-st {command}: error: '), err
    return err[0]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError('a training epoch started')
    monkeypatch.setattr(runner_module, 'train_one_epoch', refuse)


# ---------------------------------------------------------------------------------------------
# --check

def test_check_passes_a_good_run_and_writes_nothing(tmp_path, image_folder, capsys, no_training):
    argv = BASE + ['--stimulative', 'num_subnets=1', '--data-dir', str(image_folder), '--output', str(tmp_path / 'o'),
                   '--experiment', 'run', '--check']
    assert train_main(argv) == 0
    assert 'the run is valid' in capsys.readouterr().out
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('case', ['recipe_key', 'existing_run', 'num_classes'])
def test_check_refuses_what_the_run_would_refuse(tmp_path, image_folder, capsys, no_training, case):
    """--check refuses with the run's own checks: recipe keys (parsing), the run-folder policy (a folder holding
    another run) and the dataset (its class count), each before any work, and writes nothing."""
    existing = tmp_path / 'o' / 'run'
    existing.mkdir(parents=True)
    if case == 'existing_run':
        (existing / 'summary.csv').write_text('epoch,train_loss\n0,1.0\n')
    extra = {'recipe_key': ['--config', str(tmp_path / 'bad.yaml')], 'existing_run': [],
             'num_classes': ['--num-classes', '5']}[case]
    (tmp_path / 'bad.yaml').write_text(yaml.safe_dump({'weight_decai': 0.1}))
    before = files(tmp_path)
    argv = BASE + extra + ['--data-dir', str(image_folder), '--output', str(tmp_path / 'o'), '--experiment', 'run']
    assert train_main(argv + ['--check']) == 2
    line = one_error_line(capsys, 'train')
    assert {'recipe_key': 'weight_decai', 'existing_run': 'already holds a run',
            'num_classes': 'num_classes is 5 but the dataset has 3'}[case] in line
    assert files(tmp_path) == before
    assert train_main(argv) == 2 and one_error_line(capsys, 'train') == line  # the same refusal as a real run


# ---------------------------------------------------------------------------------------------
# bad input: exit code 2 and one line on every command

@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / 'a_file'
    path.write_text('not a folder')
    return path


def test_train_output_naming_a_file(tmp_path, image_folder, a_file, capsys):
    assert train_main(BASE + ['--data-dir', str(image_folder), '--output', str(a_file)]) == 2
    assert 'is a file, not a folder' in one_error_line(capsys, 'train')
    assert train_main(BASE + ['--data-dir', str(image_folder), '--output', str(a_file / 'sub')]) == 2
    assert a_file.read_text() == 'not a folder'


def test_analyze_bad_input(tmp_path, a_file, capsys):
    assert analyze_main([str(tmp_path / 'missing_run'), '--output', str(tmp_path / 'o')]) == 2
    one_error_line(capsys, 'analyze')
    run = tmp_path / 'run'
    run.mkdir()
    assert analyze_main([str(run), '--output', str(a_file)]) == 2
    assert 'is a file, not a folder' in one_error_line(capsys, 'analyze')


def test_publish_bad_input(tmp_path, a_file, capsys):
    assert publish_main([str(tmp_path / 'missing_run'), '--local-dir', str(tmp_path / 'x')]) == 2
    assert 'does not exist' in one_error_line(capsys, 'publish')
    assert publish_main([str(tmp_path)]) == 2  # neither --repo-id nor --local-dir
    one_error_line(capsys, 'publish')


def test_cli_unknown_command_and_bad_options(capsys):
    assert cli_main(['trian']) == 2
    assert 'unknown command' in capsys.readouterr().err
    assert cli_main(['train', '--batch-size', 'eight']) == 2
    with pytest.raises(SystemExit) as info:
        cli_main(['analyze', '--bn', 'nope'])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------
# the hook's earlier module path

STAND_IN_SCRIPT = FAKE_TRAIN_PY + '''
import importlib
import sys

import timm
import timm_st.models  # noqa: F401  (registers resnet20_cifar; does not activate any hook)

torch.manual_seed(0)
ARGS, MODEL, VAL_INTERVAL, MODULE = None, timm.create_model('resnet20_cifar', num_classes=3), 1, sys.modules[__name__]
_g = torch.Generator().manual_seed(0)
LOADER = [(torch.randn(4, 3, 16, 16, generator=_g), torch.randint(0, 3, (4,), generator=_g)) for _ in range(2)]
# as train.py: main() imports the recipe's device_modules right after parsing
ACTIVATE = lambda module: [importlib.import_module(m) for m in module._parse_args().device_modules or ()]

if __name__ == '__main__':
    task = main()
    print('TASK', type(task).__name__)
'''


def test_old_hook_path_runs_as_before(tmp_path, image_folder):
    """A recipe naming timm_st.hook (device_modules and task), the hook's earlier home: train.py trains with
    stimulative training and says once where the hook lives now; timm-st train accepts the recipe too."""
    (tmp_path / 'train.py').write_text(STAND_IN_SCRIPT)
    recipe = tmp_path / 'old.yaml'
    recipe.write_text(yaml.safe_dump({
        'model': 'resnet20_cifar', 'num_classes': 3, 'epochs': 1, 'batch_size': 4, 'workers': 1, 'device': 'cpu',
        'device_modules': ['timm_st.hook'], 'stimulative': {'num_subnets': 1}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run([sys.executable, str(tmp_path / 'train.py'), '-c', str(recipe), '--data-dir',
                           str(image_folder), '--output', str(tmp_path / 'out')], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'TASK StimulativeTask' in proc.stdout and 'Traceback' not in proc.stderr
    assert proc.stderr.count('timm_st.hook is now timm_st.commands.hook') == 1
    recipe.write_text(yaml.safe_dump({'device_modules': ['timm_st.hook'], 'task': 'timm_st.hook:create_task'}))
    assert train_main(['-c', str(recipe)] + BASE + ['--data-dir', str(image_folder), '--output', str(tmp_path / 'o'),
                                                    '--stimulative', 'num_subnets=1', '--check']) == 0


# ---------------------------------------------------------------------------------------------
# logging: TensorBoard, the saver's list, library warnings once

def test_tensorboard_event_files_hold_the_epoch_rows(tmp_path, image_folder):
    event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    argv = BASE + ['--epochs', '2', '--log-tensorboard', '--data-dir', str(image_folder), '--output', str(tmp_path),
                   '--experiment', 'run']
    assert train_main(argv) == 0
    assert list((tmp_path / 'run').glob('events.out.tfevents.*'))
    events = event_accumulator.EventAccumulator(str(tmp_path / 'run'))
    events.Reload()
    assert {'train_loss', 'eval_top1', 'lr'} <= set(events.Tags()['scalars'])
    rows = list(__import__('csv').DictReader(open(tmp_path / 'run' / 'summary.csv')))
    logged = events.Scalars('eval_top1')
    assert [e.step for e in logged] == [0, 1]
    assert [e.value for e in logged] == pytest.approx([float(r['eval_top1']) for r in rows])


def test_saver_logs_one_line_per_epoch(tmp_path, image_folder, caplog):
    caplog.set_level(logging.DEBUG, logger='timm.utils.checkpoint_saver')
    caplog.set_level(logging.DEBUG, logger='timm_st.runs.loggers')
    argv = BASE + ['--epochs', '3', '--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment', 'run']
    assert train_main(argv) == 0
    saver = [r for r in caplog.records if r.name == 'timm.utils.checkpoint_saver' and r.levelno >= logging.INFO]
    assert [r.getMessage().startswith('Checkpoint saved (') for r in saver].count(True) == 3
    assert all('\n' not in r.getMessage() and 'Current checkpoints' not in r.getMessage() for r in saver)
    kept = [r for r in caplog.records if r.levelno == logging.DEBUG and 'Kept checkpoints' in r.getMessage()]
    assert len(kept) == 3 and 'checkpoint-2.pth.tar' in kept[-1].getMessage()


def test_library_warnings_printed_once():
    code = ('from timm_st.runs.loggers import setup_logging; setup_logging(); import logging; '
            'logging.getLogger("huggingface_hub.utils._http").warning("retry 1 of 12")')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.count('retry 1 of 12') == 1, proc.stderr
