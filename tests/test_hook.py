"""timm_st.commands.hook (no-patch route) and patches/ (the --task option) for timm's own train.py.

Part (a) runs the hook's logic on a fake train.py namespace. Part (b) runs the real train.py of a
pytorch-image-models checkout, whose path comes from the environment variable TIMM_TRAIN_PY
(e.g. TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py); without it those tests are skipped.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_st.commands.hook as hook
import timm_st.method.task
import timm_st.runs.hook
from timm_st import StimulativeConfig, StimulativeTask
from conftest import write_image_folder
from timm_st.runs.errors import RunError

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / 'patches' / 'train_task_option.patch'
APPLY = REPO / 'patches' / 'apply.sh'

# --- (a) the hook's logic on a fake train.py ------------------------------------------------------

# the parts of timm's train.py the hook relies on, with the same names and signatures
FAKE_TRAIN_PY = '''
import argparse
import os
from contextlib import suppress

import torch
import yaml
from timm import utils
from timm.task import ClassificationTask

events = []
# as train.py: config_parser reads the recipe path (-c), the global parser the rest, with the recipe as defaults
config_parser = parser = argparse.ArgumentParser(add_help=False)
parser.add_argument('-c', '--config', default='')
parser = argparse.ArgumentParser()
parser.add_argument('data', nargs='?')
parser.add_argument('--data-dir', default=None)
parser.add_argument('--dataset', default='')
parser.add_argument('--train-split', default='train')
parser.add_argument('--val-split', default='validation')
parser.add_argument('--model', default='resnet50')
parser.add_argument('--resume', default='')
parser.add_argument('--initial-checkpoint', default='')
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--img-size', type=int, default=None)
parser.add_argument('--input-size', type=int, nargs=3, default=None)
parser.add_argument('--mean', type=float, nargs='+', default=None)
parser.add_argument('--std', type=float, nargs='+', default=None)
parser.add_argument('-b', '--batch-size', type=int, default=128)
parser.add_argument('--device', default='cuda')
parser.add_argument('--opt', default='sgd')
parser.add_argument('--weight-decay', type=float, default=2e-5)
parser.add_argument('--sched', default='cosine')
parser.add_argument('--lr', type=float, default=None)
parser.add_argument('--epochs', type=int, default=300)
parser.add_argument('--warmup-epochs', type=int, default=5)
parser.add_argument('--mixup', type=float, default=0.0)
parser.add_argument('--cutmix', type=float, default=0.0)
parser.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
parser.add_argument('--smoothing', type=float, default=0.1)
parser.add_argument('--bce-loss', action='store_true', default=False)
parser.add_argument('-j', '--workers', type=int, default=4)
parser.add_argument('--output', default='')
parser.add_argument('--experiment', default='')
parser.add_argument('--kd-model-name', default=None)
parser.add_argument('--device-modules', nargs='+', default=None)
parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor')
parser.add_argument('--torchcompile-mode', type=str, default=None)


def _parse_args():
    config, remaining = config_parser.parse_known_args()  # sys.argv, as train.py
    if config.config:
        with open(config.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    return parser.parse_args(remaining)


def train_one_epoch(epoch, model, loader, optimizer, args, task=None, device=torch.device('cpu'),
                    amp_autocast=suppress, **kwargs):
    # as timm's: the task's trainable module in train mode; per batch the task's loss, one backward, one step
    events.append(('train', epoch, task.epoch if hasattr(task, 'epoch') else None))
    task.get_trainable_module().train()
    total = 0.0
    for x, y in loader:
        with amp_autocast():
            loss = task(x.to(device), y.to(device))['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.update_ema()
        total += float(loss.detach())
    return {'loss': total / len(loader)}


def validate(model, loader, loss_fn, args, device=torch.device('cpu'), amp_autocast=suppress, model_dtype=None,
             log_suffix=''):
    # as timm's: the evaluation model in eval mode, no gradients, loss and top-1 over the loader
    events.append(('validate' + log_suffix,))
    model.eval()
    loss = correct = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            with amp_autocast():
                output = model(x.to(device))
            loss += float(torch.nn.functional.cross_entropy(output.float(), y, reduction='sum'))
            correct += float((output.argmax(-1) == y).sum())
            count += len(y)
    return {'loss': loss / count, 'top1': 100 * correct / count, 'top5': 100.0}


def main():
    args = ARGS if ARGS is not None else _parse_args()
    if ACTIVATE:
        ACTIVATE(MODULE)  # as importing the device_modules does
    model = MODEL
    task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), device=torch.device('cpu'),
                              dtype=None, verbose=False)
    output = os.path.join(args.output or './output/train', args.experiment or 'run')
    os.makedirs(output, exist_ok=True)  # as train.py: the output folder is written after the setup
    with open(os.path.join(output, 'args.yaml'), 'w') as f:
        f.write(repr(sorted(vars(args))))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        train_one_epoch(epoch, model, LOADER, optimizer, args, task=task, amp_autocast=suppress)
        if (epoch + 1) % VAL_INTERVAL == 0:
            validate(model, LOADER, None, args, amp_autocast=suppress)
            validate(model, LOADER, None, args, amp_autocast=suppress, log_suffix=' (EMA)')
    with open(os.path.join(output, 'last.pth.tar'), 'wb') as f:
        f.write(b'weights')
    return task
'''


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model('resnet20_cifar', num_classes=3)


DATA = {}


@pytest.fixture(autouse=True)
def _data_dir(image_folder, tmp_path, monkeypatch):
    """The stand-in runs read the shared tiny image folder and write under the test's tmp_path."""
    DATA['dir'] = str(image_folder)
    monkeypatch.chdir(tmp_path)


def make_args(stimulative=None, **extra):
    """train.py's parsed args for a tiny valid CPU run (the options the hook and its checks read)."""
    args = argparse.Namespace(**{**dict(
        config='', data=None, data_dir=DATA['dir'], dataset='', train_split='train', val_split='validation',
        model='resnet20_cifar', resume='', initial_checkpoint='', num_classes=3, img_size=None, input_size=None,
        mean=None, std=None, batch_size=4, device='cpu', opt='sgd', weight_decay=2e-5, sched='cosine', lr=None,
        epochs=2, mixup=0.0, cutmix=0.0, cutmix_minmax=None, smoothing=0.1, bce_loss=False, workers=1, output='',
        experiment='', kd_model_name=None, device_modules=None), **extra})
    if stimulative is not None:
        args.stimulative = stimulative
    return args


def fake_train_module(tmp_path, args, name='train.py', activate=None, val_interval=1, source=FAKE_TRAIN_PY):
    """A stand-in timm train.py module; its main() uses `args`, or parses sys.argv (recipe + command line) as
    train.py does when `args` is None."""
    module = types.ModuleType('__main__')
    module.__file__ = str(tmp_path / name)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    module.__dict__.update(ARGS=args, ACTIVATE=activate, MODEL=tiny_model(), LOADER=loader,
                           MODULE=module, VAL_INTERVAL=val_interval)
    exec(compile(source, module.__file__, 'exec'), module.__dict__)
    return module


@pytest.fixture
def recorded_recalibration(monkeypatch):
    """Replaces the hook's recalibrate_bn: each call appends ('recalibrate', n) to `.events`."""
    recorder = types.SimpleNamespace(events=[])

    def fake_recalibrate(model, loader, num_images, device=None, autocast=None):
        assert next(iter(loader)).shape == (4, 3, 16, 16)  # the training loader's images
        recorder.events.append(('recalibrate', num_images))
        return num_images

    monkeypatch.setattr(timm_st.method.task, 'recalibrate_bn', fake_recalibrate)
    return recorder


def test_plain_import_is_a_no_op():
    # under pytest, __main__ is not a timm train.py: importing the hook installed nothing
    assert hook.STATE is None
    assert hook.activate() is None


@pytest.mark.parametrize('name, timm_global', [('cli.py', True), ('train.py', False), ('__main__.py', True)])
def test_no_op_when_main_is_not_timm_train_py(tmp_path, name, timm_global):
    module = types.ModuleType('__main__')
    module.__file__ = str(tmp_path / name)
    if timm_global:
        module.timm = timm
    module.ClassificationTask = 'untouched'
    assert not hook.is_timm_train_script(module)
    assert hook.activate(module) is None
    assert module.ClassificationTask == 'untouched'


def test_no_op_for_timm_st_modules():
    import timm_st.commands.train as ours
    assert not hook.is_timm_train_script(ours)  # its name is train.py and it uses timm, but it is ours


def test_without_stimulative_nothing_changes(tmp_path):
    module = fake_train_module(tmp_path, make_args())
    before = {n: module.__dict__[n] for n in ('ClassificationTask', 'train_one_epoch', 'validate')}
    assert hook.install(module, module.ARGS) is None
    assert {n: module.__dict__[n] for n in before} == before
    task = module.main()
    assert type(task) is timm.task.ClassificationTask


def test_install_builds_stimulative_task(tmp_path):
    section = {'num_subnets': 2, 'loss': 'kl', 'coef_schedule': 'cosine_up', 'recalibrate_bn': 8}
    args = make_args(section, epochs=5)
    module = fake_train_module(tmp_path, args)
    state = hook.install(module, args)
    assert state is not None and state.config == StimulativeConfig.from_dict(section)
    criterion = torch.nn.CrossEntropyLoss()
    task = module.ClassificationTask(model=module.MODEL, criterion=criterion, device=torch.device('cpu'),
                                     dtype=None, verbose=False)
    assert isinstance(task, StimulativeTask)
    assert task is state.task and task.model is module.MODEL and task.criterion is criterion
    assert task.config == state.config and task.num_epochs == 5
    assert hook.install(module, args) is state  # a second import does not wrap twice


def test_install_logs_the_method_with_its_schedule(tmp_path, caplog):
    # with subnet_interval the log must not claim sub-networks on every step
    args = make_args({'num_subnets': 1, 'subnet_interval': 4})
    with caplog.at_level('INFO', logger='timm_st.runs.hook'):
        hook.install(fake_train_module(tmp_path, args), args)
    assert 'with sub-networks on every 4th step; num_subnets 1' in caplog.text and 'per step' not in caplog.text


def test_train_py_loaders_get_the_prefetcher_guard_and_the_keyed_training_loader(tmp_path, monkeypatch):
    guarded, keyed = [], []
    monkeypatch.setattr(timm_st.runs.hook, 'guard_prefetcher', lambda loader: guarded.append(loader) or loader)
    monkeypatch.setattr(timm_st.runs.hook, 'seeded_loader', lambda loader, *a: keyed.append(loader) or loader)
    args = make_args({'num_subnets': 1}, seed=0, mixup_off_epoch=0)
    module = fake_train_module(tmp_path, args)
    module.create_loader = lambda dataset, **kw: dataset
    hook.install(module, args)
    module.create_loader('train', is_training=True)
    module.create_loader('eval', is_training=False)
    assert guarded == ['train', 'eval'] and keyed == ['train']


def test_epochs_follow_command_line_override(tmp_path):
    # args are the parsed ones (recipe + command line): the factory reads epochs when it runs
    args = make_args({'coef_schedule': 'cosine_down'}, epochs=300)
    module = fake_train_module(tmp_path, args)
    hook.install(module, args)
    args.epochs = 3
    task = module.ClassificationTask(model=module.MODEL, criterion=None, device=None, dtype=None, verbose=False)
    assert task.num_epochs == 3


def test_set_epoch_and_recalibration_once_per_epoch_before_validate(tmp_path, recorded_recalibration):
    args = make_args({'num_subnets': 1, 'recalibrate_bn': 8}, epochs=3)
    module = fake_train_module(tmp_path, args, activate=hook.activate)
    recorded_recalibration.events = module.events
    task = module.main()  # main() imports the hook (activate), as train.py's device_modules do
    assert isinstance(task, StimulativeTask)
    expected = []
    for epoch in range(3):
        expected += [('train', epoch, epoch), ('recalibrate', 8), ('validate',), ('validate (EMA)',)]
    assert module.events == expected
    assert [e[0] for e in module.events].count('recalibrate') == 3


def _final_weights(tmp_path, section, monkeypatch):
    """Train the stand-in train.py (timm's step) through the hook: (task, plans drawn, final weights)."""
    drawn = []
    sample = StimulativeTask._sample
    monkeypatch.setattr(StimulativeTask, '_sample', lambda self, h: drawn.append(sample(self, h)) or drawn[-1])
    args = make_args(section, epochs=2)
    module = fake_train_module(tmp_path, args, activate=hook.activate)
    before = {k: v.clone() for k, v in module.MODEL.state_dict().items()}
    task = module.main()
    after = module.MODEL.state_dict()
    return task, drawn, before, after


def test_hook_run_trains_subnetworks(tmp_path, monkeypatch):
    """In CI: the hook makes the stand-in train.py train sub-networks. Its sampler draws every step's plans, their
    loss is finite, and their gradients reach the weights (the same run without sub-networks ends elsewhere)."""
    task, drawn, before, after = _final_weights(tmp_path, {'num_subnets': 2, 'recalibrate_bn': 0}, monkeypatch)
    assert isinstance(task, StimulativeTask) and len(drawn) == 2 * 3 * 2  # epochs x steps x sub-networks
    assert task.subnet_loss is not None and torch.isfinite(task.subnet_loss)
    floats = [k for k, v in after.items() if v.is_floating_point()]
    assert sum(not torch.equal(after[k], before[k]) for k in floats) > 0.9 * len(floats)
    plain_task, plain_drawn, _, plain_after = _final_weights(tmp_path, {'num_subnets': 0, 'recalibrate_bn': 0},
                                                             monkeypatch)
    assert plain_drawn == [] and plain_task.subnet_loss is None
    differ = [k for k in floats if 'weight' in k and not torch.allclose(after[k], plain_after[k])]
    assert len(differ) > 0.9 * len([k for k in floats if 'weight' in k])


def test_no_recalibration_without_validation_or_when_off(tmp_path, recorded_recalibration):
    args = make_args({'recalibrate_bn': 8}, epochs=4)
    module = fake_train_module(tmp_path, args, activate=hook.activate, val_interval=2)
    recorded_recalibration.events = module.events
    module.main()
    assert [e[0] for e in module.events].count('recalibrate') == 2  # epochs 1 and 3 validate
    assert module.events.index(('recalibrate', 8)) == module.events.index(('validate',)) - 1

    args = make_args({'recalibrate_bn': 0}, epochs=2)
    module = fake_train_module(tmp_path, args, activate=hook.activate)
    recorded_recalibration.events = module.events
    module.main()
    assert 'recalibrate' not in [e[0] for e in module.events]


def test_before_validate_recalibrates_real_statistics():
    model = tiny_model()
    task = StimulativeTask(model, {'recalibrate_bn': 8}, num_epochs=2, verbose=False)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    loader = [(torch.randn(4, 3, 16, 16) * 3 + 5, torch.zeros(4, dtype=torch.long)) for _ in range(4)]
    mean = bn.running_mean.clone()
    task.set_epoch(0)
    assert task.before_validate(loader) == 8
    assert not torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == 2
    after = bn.running_mean.clone()
    assert task.before_validate(loader) == 0  # once per epoch
    assert torch.equal(bn.running_mean, after)
    task.set_epoch(1)
    assert task.before_validate(loader) == 8


@pytest.mark.parametrize('section, message', [
    ({'loss': 'nope'}, 'stimulative.loss'),
    ({'num_subnets': -1}, 'stimulative.num_subnets'),
    ({'typo_key': 1}, 'unknown key'),
    ([1, 2], 'expected a mapping'),
])
def test_bad_section_stops_before_training(tmp_path, capsys, section, message):
    args = make_args(section)
    module = fake_train_module(tmp_path, args, activate=hook.activate)
    original = module.ClassificationTask
    assert message in refusal(capsys, module.main)
    assert module.ClassificationTask is original and module.events == []


def refusal(capsys, call) -> str:
    """Run `call`, which must stop as the hook stops train.py: exit code 2 and one line on stderr, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('timm_st: error: ') and err.count('\n') == 1, err
    return err


def test_conflicting_options_are_refused(tmp_path):
    args = make_args({'loss': 'dkd'})
    args.mixup = 0.8
    with pytest.raises(RunError, match='class-index targets'):
        hook.install(fake_train_module(tmp_path, args), args)
    args = make_args({'num_subnets': 1})
    args.kd_model_name = 'resnet50'
    with pytest.raises(RunError, match='kd_model_name'):
        hook.install(fake_train_module(tmp_path, args), args)


def test_model_without_adapter_fails_clearly(tmp_path):
    args = make_args({'num_subnets': 1})
    module = fake_train_module(tmp_path, args)
    hook.install(module, args)
    with pytest.raises(RunError, match='timm_st'):
        module.ClassificationTask(model=torch.nn.Linear(3, 3), criterion=None, device=None, dtype=None, verbose=False)


def _edit(old, new):
    assert old in FAKE_TRAIN_PY
    return FAKE_TRAIN_PY.replace(old, new)


@pytest.mark.parametrize('source, problem', [
    (_edit('from timm.task import ClassificationTask', 'from timm.task import TrainingTask as ClassificationTask'),
     'ClassificationTask'),
    (_edit('def train_one_epoch(epoch, model, loader, optimizer, args, task=None,',
           'def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, task=None,'), 'train_one_epoch'),
    (_edit('amp_autocast=suppress, model_dtype=None,\n             log_suffix',
           'model_dtype=None,\n             log_suffix'), 'validate'),
    (_edit('def validate(', 'def evaluate(').replace('validate(model, LOADER, None, args, amp_autocast=suppress)', 'pass')
     .replace("validate(model, LOADER, None, args, amp_autocast=suppress, log_suffix=' (EMA)')", 'pass'), 'validate'),
])
def test_unsupported_train_py_names_versions_and_patch(tmp_path, capsys, source, problem):
    args = make_args({'num_subnets': 1})
    module = fake_train_module(tmp_path, args, activate=hook.activate, source=source)
    message = refusal(capsys, module.main)
    assert problem in message and 'v1.0.28' in message and 'aa4b5850' in message and 'patches/' in message


def test_args_not_found_outside_main(tmp_path, capsys):
    module = fake_train_module(tmp_path, make_args({'num_subnets': 1}))
    message = refusal(capsys, lambda: hook.activate(module))  # a train.py importing the hook outside main()
    assert 'main()' in message and 'patches/' in message


def test_missing_args_option_is_unsupported(tmp_path):
    args = make_args({'num_subnets': 1})
    del args.epochs
    with pytest.raises(hook.UnsupportedTrainScript, match='epochs'):
        hook.install(fake_train_module(tmp_path, args), args)


def _with_task_option(module):
    module.parser.add_argument('--task', default=None)
    return module


def test_patched_train_py_with_task_option_is_left_alone(tmp_path):
    args = make_args({'num_subnets': 1}, task=hook.FACTORY_PATH)
    module = _with_task_option(fake_train_module(tmp_path, args))
    original = module.ClassificationTask
    assert hook.install(module, args) is None and module.ClassificationTask is original
    # the same recipe on an unpatched train.py: `task` is an unknown key there, the hook does the work
    module = fake_train_module(tmp_path, args)
    assert hook.install(module, args) is not None
    # a patched train.py told to build another task while the recipe asks for stimulative training
    args = make_args({'num_subnets': 1}, task='timm.task:ClassificationTask')
    with pytest.raises(RunError, match='--task'):
        hook.install(_with_task_option(fake_train_module(tmp_path, args)), args)


def test_create_task_factory_for_patched_train_py():
    args = make_args({'num_subnets': 2, 'loss': 'kl', 'coef_schedule': 'cosine_up'}, epochs=7)
    task = hook.create_task(model=tiny_model(), criterion=None, device=torch.device('cpu'), dtype=None,
                            verbose=False, args=args, num_subnets=3)  # --task-kwargs override single keys
    assert isinstance(task, StimulativeTask) and task.num_epochs == 7
    assert task.config == StimulativeConfig.from_dict({'num_subnets': 3, 'loss': 'kl', 'coef_schedule': 'cosine_up'})
    with pytest.raises(RunError, match='stimulative.temperature'):
        hook.create_task(model=tiny_model(), args=args, temperature=0)
    # a common-training recipe: timm's ClassificationTask, as timm-st train builds
    task = hook.create_task(model=tiny_model(), criterion=None, device=None, dtype=None, verbose=False,
                            args=make_args())
    assert type(task) is timm.task.ClassificationTask
    assert isinstance(hook.create_task(model=tiny_model(), args=make_args(), num_subnets=1), StimulativeTask)


# --- (b) the real train.py ---------------------------------------------------------------------

TRAIN_PY = os.environ.get('TIMM_TRAIN_PY')
needs_train_py = pytest.mark.skipif(
    not TRAIN_PY or not os.path.isfile(TRAIN_PY),
    reason='set TIMM_TRAIN_PY to the train.py of a pytorch-image-models checkout (e.g. '
           'TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py) to run timm\'s own script'
           + (f' (TIMM_TRAIN_PY={TRAIN_PY!r} is not a file)' if TRAIN_PY else ' (unset)'))

RECORDER = 'timm_st_test_recorder'
# a device module that records every sampled plan and every step's loss (JSON lines in $ST_RECORD)
RECORDER_SRC = '''
import json
import os

from timm_st.method.task import StimulativeTask

_sample, _forward = StimulativeTask._sample, StimulativeTask.forward


def _write(record):
    with open(os.environ['ST_RECORD'], 'a') as f:
        f.write(json.dumps(record) + '\\n')


def _recording_sample(self, input_height):
    plan = _sample(self, input_height)
    _write({'plan': [[list(stage) for stage in plan.blocks], plan.input_size]})
    return plan


def _recording_forward(self, input, target):
    result = _forward(self, input, target)
    _write({'loss': result['loss'].item(), 'epoch': self.epoch, 'target': target.tolist()})
    return result


StimulativeTask._sample = _recording_sample
StimulativeTask.forward = _recording_forward
'''

STIMULATIVE = {'num_subnets': 2, 'input_scale': [0.5, 1.0], 'recalibrate_bn': 16}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('timm_train_py')
    write_image_folder(root / 'data')
    (root / 'plugins').mkdir()
    (root / 'plugins' / f'{RECORDER}.py').write_text(RECORDER_SRC)
    return root


def recipe(path, stimulative=None, device_modules=('timm_st.commands.hook', RECORDER), **extra):
    """A one-epoch CPU recipe: 3 steps of 8 images, fp32, no augmentation randomness, one loader worker
    (timm's loader before 1.0.29 refuses workers 0 in train.py)."""
    keys = {**dict(model='resnet20_cifar', num_classes=3, img_size=16, crop_pct=1.0, batch_size=8, epochs=1,
                   warmup_epochs=0, lr=0.05, workers=1, no_aug=True, no_prefetcher=True, mixup=0.0, cutmix=0.0,
                   seed=42, log_interval=1, device_modules=list(device_modules)), **extra}
    if stimulative is not None:
        keys['stimulative'] = stimulative
    path.write_text(yaml.safe_dump(keys))
    return path


class TrainPyRun:
    """timm's train.py in a subprocess; `finish()` waits and sets rc, records, stdout and output."""

    def __init__(self, script, workdir, recipe_path, name, *extra):
        self.record = workdir / f'{name}.jsonl'
        self.record.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS='1', ST_RECORD=str(self.record),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(workdir / 'plugins'), os.environ.get('PYTHONPATH')])))
        cmd = [sys.executable, str(script), '--config', str(recipe_path), '--data-dir', str(workdir / 'data'),
               '--device', 'cpu', '--output', str(workdir / 'out'), '--experiment', name, *extra]
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def finish(self):
        self.stdout, stderr = self.proc.communicate(timeout=300)
        self.rc = self.proc.returncode
        self.output = self.stdout + stderr
        self.records = read_records(self.record)
        return self


def run_train_py(*args):
    run = TrainPyRun(*args).finish()
    return run.rc, run.records, run.output


def read_records(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def plans(records):
    return [r['plan'] for r in records if 'plan' in r]


def losses(records):
    return [r['loss'] for r in records if 'loss' in r]


def result_json(output):
    """The `--result` JSON train.py prints at the end (train and validation metrics per epoch)."""
    return json.JSONDecoder().raw_decode(output[output.index('--result') + len('--result'):].lstrip())[0]


@pytest.fixture(scope='module')
def hook_run(workdir):
    """One ST epoch through timm's unmodified train.py, the hook route."""
    path = recipe(workdir / 'st.yaml', STIMULATIVE)
    rc, records, output = run_train_py(TRAIN_PY, workdir, path, 'hook')
    assert rc == 0, output[-3000:]
    return records, output


@needs_train_py
def test_hook_route_trains_one_epoch(hook_run, workdir):
    records, output = hook_run
    assert 'timm_st.commands.hook: stimulative training' in output and 'StimulativeTask' in output
    assert len(losses(records)) == 3 and len(plans(records)) == 3 * STIMULATIVE['num_subnets']
    assert all(r['epoch'] == 0 for r in records if 'loss' in r)
    assert output.count('Re-estimated BatchNorm statistics of the model on 16 training images (epoch 0)') == 1
    assert output.index('Re-estimated BatchNorm') < output.index('Test: [')
    assert result_json(output)[0]['epoch'] == 0
    checkpoint = torch.load(workdir / 'out' / 'hook' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert 'subnet_sampler' in checkpoint['task_state'] and checkpoint['args'].stimulative == STIMULATIVE


@needs_train_py
def test_without_stimulative_both_routes_are_plain_timm(workdir, patched_train_py):
    """A CT recipe naming the hook and the task factory trains exactly as timm does with only
    timm-st's models registered, on the unpatched and on the patched train.py."""
    ours = recipe(workdir / 'ct.yaml', device_modules=('timm_st.commands.hook',), task=hook.FACTORY_PATH)
    plain = recipe(workdir / 'ct_plain.yaml', device_modules=('timm_st',))
    runs = [TrainPyRun(TRAIN_PY, workdir, ours, 'ct_hook'), TrainPyRun(patched_train_py, workdir, ours, 'ct_patched'),
            TrainPyRun(TRAIN_PY, workdir, plain, 'ct_plain')]
    runs = [run.finish() for run in runs]
    for run in runs:
        assert run.rc == 0, run.output[-3000:]
        assert 'timm_st.commands.hook' not in run.output and 'StimulativeTask' not in run.output
    assert result_json(runs[0].stdout) == result_json(runs[2].stdout) == result_json(runs[1].stdout)


@needs_train_py
def test_hook_route_bad_section_stops_before_training(workdir):
    path = recipe(workdir / 'bad.yaml', {'num_subnets': 1, 'loss': 'nope'})
    rc, records, output = run_train_py(TRAIN_PY, workdir, path, 'bad')
    assert rc != 0 and records == []
    assert "stimulative.loss: got 'nope'" in output and 'Train:' not in output


def _patch_fits_checkout() -> bool:
    """Whether TRAIN_PY is the train.py the patch is written for (its blob hash in the patch's index line)."""
    import re
    written_for = re.search(r'^index ([0-9a-f]+)\.\.', PATCH.read_text(), re.M).group(1)
    blob = subprocess.run(['git', 'hash-object', TRAIN_PY], capture_output=True, text=True).stdout.strip()
    return blob.startswith(written_for)


@pytest.fixture(scope='module')
def patched_train_py(workdir):
    if not _patch_fits_checkout():
        pytest.skip('patches/train_task_option.patch is written for the train.py of timm commit aa4b5850; '
                    f'TIMM_TRAIN_PY={TRAIN_PY} is another one')
    copy = workdir / 'timm_patched'
    copy.mkdir()
    shutil.copy(TRAIN_PY, copy / 'train.py')
    proc = subprocess.run(['bash', str(APPLY), str(copy)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = subprocess.run(['bash', str(APPLY), str(copy)], capture_output=True, text=True)
    assert again.returncode == 0 and 'already' in again.stdout
    return copy / 'train.py'


def test_patch_states_its_commit():
    header = PATCH.read_text().split('diff --git', 1)[0]
    assert 'aa4b5850c1543fa488abf260f18390eda46cf85d' in header


def test_apply_script_refuses_a_train_py_it_does_not_fit(tmp_path):
    (tmp_path / 'train.py').write_text('print("not timm")\n')
    proc = subprocess.run(['bash', str(APPLY), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0 and 'does not apply cleanly' in proc.stderr
    assert (tmp_path / 'train.py').read_text() == 'print("not timm")\n'
    proc = subprocess.run(['bash', str(APPLY), str(tmp_path / 'missing')], capture_output=True, text=True)
    assert proc.returncode != 0 and 'not a directory' in proc.stderr


@needs_train_py
def test_patched_route_trains_one_epoch(patched_train_py, workdir, hook_run):
    # the recipe works with both routes: on the patched train.py the hook sees --task and stays out
    path = recipe(workdir / 'st_task.yaml', STIMULATIVE, device_modules=('timm_st.commands.hook', RECORDER),
                  task=hook.FACTORY_PATH)
    # --task-kwargs override single stimulative keys (recalibrate_bn only acts after the epoch's steps)
    rc, records, output = run_train_py(patched_train_py, workdir, path, 'patched', '--task-kwargs', 'recalibrate_bn=8')
    assert rc == 0, output[-3000:]
    assert 'timm_st.commands.hook: stimulative training' not in output  # no hook at work: the --task option built it
    assert 'StimulativeTask' in output
    assert output.count('Re-estimated BatchNorm statistics of the model on 8 training images (epoch 0)') == 1
    # the same run as the hook route: same plans, same losses
    assert plans(records) == plans(hook_run[0]) and losses(records) == losses(hook_run[0])

# parity with timm-st train (plans, losses, validation) for ST, ST++ and criterion cases: tests/test_parity.py


# --- timm >= 1.0.31: train.py's own --task {classification,multilabel} ----------------------------

def _with_builtin_task_option(module):
    module.parser.add_argument('--task', default='classification', choices=['classification', 'multilabel'])
    return module


def test_train_py_with_its_own_task_names(tmp_path):
    """timm 1.0.31's train.py has --task {classification,multilabel} (names only): the recipe's line naming our
    factory selects train.py's default task, which the hook replaces; its own other tasks stay its own."""
    args = make_args({'num_subnets': 1}, task=hook.FACTORY_PATH)
    module = _with_builtin_task_option(fake_train_module(tmp_path, args))
    state = hook.install(module, args)
    assert state is not None and args.task == 'classification'
    assert isinstance(module.main(), StimulativeTask)
    args = make_args(task='multilabel')  # common training with train.py's own multi-label task: left alone
    assert hook.install(_with_builtin_task_option(fake_train_module(tmp_path, args)), args) is None
    assert args.task == 'multilabel'
    args = make_args({'num_subnets': 1}, task='multilabel')
    with pytest.raises(RunError, match="selects train.py's own 'multilabel' task"):
        hook.install(_with_builtin_task_option(fake_train_module(tmp_path, args)), args)
