"""One validation of the whole run, on both runners: every malformed run is refused before any work.

Each case runs through `timm-st train` and, where the hook takes part, through a stand-in timm
train.py (tests/test_hook.py's, which parses a recipe as timm's does and imports the hook from
main()). A refusal is: exit code 2, one line on stderr naming the key or path, no training step,
and every file that existed under the output folder byte-identical afterwards (nothing new either).
"""
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_st.commands.hook as hook
import timm_st.runs.validation as validation_module
from conftest import write_image_folder
from test_hook import FAKE_TRAIN_PY, fake_train_module
from timm_st import StimulativeConfig, StimulativeTask
from timm_st.runs.errors import RunError
from timm_st.runs.options import build_parser
from timm_st.runs.recipe import parse_args
from timm_st.commands.train import main as timm_st_train

# a tiny valid run, as a recipe for either runner
RECIPE = dict(model='resnet20_cifar', num_classes=3, img_size=16, batch_size=4, epochs=1, lr=0.05, workers=1,
              device='cpu', warmup_epochs=0, mixup=0.0, cutmix=0.0, smoothing=0.1)
CLI_ONLY = dict(no_prefetcher=True, eval_subnets=0, log_interval=100, workers=0)


@pytest.fixture
def no_training(monkeypatch):
    """Any training step fails the test."""
    def step(self, *a, **k):
        raise AssertionError('a training step ran')
    monkeypatch.setattr(timm.task.ClassificationTask, 'forward', step)
    monkeypatch.setattr(StimulativeTask, 'forward', step)


def snapshot(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob('*'))}


@pytest.fixture
def output(tmp_path):
    """An output folder that already holds an earlier run (`old`), whose bytes must survive."""
    root = tmp_path / 'out'
    (root / 'old').mkdir(parents=True)
    (root / 'old' / 'args.yaml').write_text('model: resnet20_cifar\n')
    (root / 'old' / 'summary.csv').write_text('epoch,train_loss\n0,1.5\n')
    (root / 'old' / 'last.pth.tar').write_bytes(b'\x00earlier weights')
    return root


def write_recipe(path: Path, keys) -> str:
    path.write_text(yaml.safe_dump(keys))
    return str(path)


def one_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def run_cli(tmp_path, capsys, keys, extra=(), experiment='new'):
    path = write_recipe(tmp_path / 'cli.yaml', {**RECIPE, **CLI_ONLY, **keys})
    capsys.readouterr()
    code = timm_st_train(['-c', path, '--output', str(tmp_path / 'out'), '--experiment', experiment, *extra])
    return code, capsys.readouterr().err


def stand_in(tmp_path, monkeypatch, argv, activate=hook.activate):
    """The stand-in train.py run as `python train.py ARGV` (it reads sys.argv)."""
    monkeypatch.setattr(sys, 'argv', [str(tmp_path / 'train.py'), *argv])
    return fake_train_module(tmp_path, None, activate=activate)


def run_hook(tmp_path, capsys, keys, extra=(), experiment='new'):
    """The stand-in train.py: parses recipe + command line, then main() imports the hook (activate)."""
    path = write_recipe(tmp_path / 'hook.yaml', {**RECIPE, **keys})
    argv = ['-c', path, '--output', str(tmp_path / 'out'), '--experiment', experiment, *extra]
    with pytest.MonkeyPatch.context() as monkeypatch:
        module = stand_in(tmp_path, monkeypatch, argv)
        capsys.readouterr()
        try:
            module.main()
            code = 0
        except SystemExit as e:
            code = e.code
    assert code != 0 or module.events, 'the stand-in trained nothing'
    if code:
        assert module.events == []  # no training step
    return code, capsys.readouterr().err


@pytest.fixture
def bad_data(tmp_path_factory):
    """Data folders that timm's reader would accept while evaluating on training images, or cannot read."""
    root = tmp_path_factory.mktemp('bad_data')
    only_train = root / 'only_train'
    write_image_folder(only_train)
    (only_train / 'validation').rename(only_train / 'elsewhere')
    train_test = root / 'train_test'
    write_image_folder(train_test)
    (train_test / 'validation').rename(train_test / 'test')  # 'test' is no timm synonym of validation
    empty_val = root / 'empty_val'
    write_image_folder(empty_val)
    for f in (empty_val / 'validation').rglob('*.png'):
        f.unlink()
    (root / 'a_file').write_text('not a folder')
    return root


def checkpoint(path: Path, model_name: str, num_classes: int) -> str:
    model = timm.create_model(model_name, num_classes=num_classes)
    torch.save({'epoch': 0, 'arch': model_name, 'state_dict': model.state_dict()}, path)
    return str(path)


@pytest.fixture
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    (root / 'run_folder').mkdir()
    (root / 'corrupt.pth.tar').write_bytes(b'garbage')
    return dict(other_arch=checkpoint(root / 'r32.pth.tar', 'resnet32_cifar', 3),
                other_classes=checkpoint(root / 'r20_5.pth.tar', 'resnet20_cifar', 5),
                same=checkpoint(root / 'r20_3.pth.tar', 'resnet20_cifar', 3),
                folder=str(root / 'run_folder'), missing=str(root / 'nope.pth.tar'),
                corrupt=str(root / 'corrupt.pth.tar'))


BOTH, CLI, HOOK = ('cli', 'hook'), ('cli',), ('hook',)
ST = {'num_subnets': 1}

# (id, recipe keys, command line, words of the message, routes); DATA/BAD/CKPT are filled in per test
CASES = [
    ('val_split_missing', {}, ['--data-dir', 'BAD/only_train'], ["validation split 'validation' not found",
                                                                'training images'], BOTH),
    ('train_and_test_only', {}, ['--data-dir', 'BAD/train_test'], ["validation split 'validation' not found"], BOTH),
    ('same_split', {'val_split': 'train'}, [], ['same folder'], BOTH),
    ('empty_val_split', {}, ['--data-dir', 'BAD/empty_val'], ['holds no images', 'validation']),
    ('data_dir_is_file', {}, ['--data-dir', 'BAD/a_file'], ["'", 'a_file', 'is a file']),
    ('data_dir_missing', {}, ['--data-dir', 'BAD/missing'], ['missing', 'does not exist']),
    ('lr_nan', {'lr': math.nan}, [], ['lr must be a finite number >= 0', 'nan']),
    ('lr_negative', {}, ['--lr', '-0.1'], ['lr must be a finite number >= 0', '-0.1']),
    ('epochs_0', {'epochs': 0}, [], ['epochs must be >= 1', '0']),
    ('batch_size_0', {}, ['--batch-size', '0'], ['batch_size must be >= 1']),
    ('mean_length', {'mean': [0.5, 0.5]}, [], ['mean', '2 values', '3 input channels']),
    ('img_size_negative', {'img_size': -16}, [], ['img_size must be >= 1', '-16']),
    ('device_unknown', {'device': 'quantum'}, [], ["device 'quantum'", 'cpu']),
    ('device_cuda', {'device': 'cuda'}, [], ["device 'cuda'", '--device cpu']),
    ('optimizer_unknown', {'opt': 'adamw2'}, [], ["optimizer 'adamw2'", 'list_optimizers']),
    ('scheduler_unknown', {'sched': 'cosin'}, [], ["scheduler 'cosin'", 'cosine']),
    ('resume_other_arch', {}, ['--resume', 'CKPT/other_arch'], ['does not fit', "'resnet20_cifar'", 'unexpected weights']),
    ('resume_other_classes', {}, ['--resume', 'CKPT/other_classes'], ['does not fit', 'with 3 classes',
                                                                      '[5, 64] there, [3, 64] here']),
    ('initial_other_classes', {}, ['--initial-checkpoint', 'CKPT/other_classes'], ['does not fit']),
    ('resume_folder', {}, ['--resume', 'CKPT/folder'], ['is a folder', 'last.pth.tar']),
    ('resume_missing', {}, ['--resume', 'CKPT/missing'], ['nope.pth.tar', 'does not exist']),
    ('resume_corrupt', {}, ['--resume', 'CKPT/corrupt'], ['corrupt.pth.tar', 'cannot be read']),
    ('misspelled_weight_decay', {'weight_decy': 0.1}, [], ["'weight_decy'", "did you mean 'weight_decay'"]),
    ('misspelled_learning_rate', {'learning_rate': 0.1}, [], ["'learning_rate'", 'not supported']),
    ('unknown_model', {'model': 'resnet51'}, [], ["unknown model 'resnet51'"]),
    ('kl_direction_with_bce', {'bce_loss': True, 'stimulative': {'loss': 'kl_direction'}}, [],
     ['kl_direction', 'bce_loss', 'loss: kl']),
    ('hard_label_loss_with_mixup', {'mixup': 0.5, 'stimulative': {'loss': 'dkd'}}, [], ["'dkd'", 'mixup']),
    ('bad_section', {'stimulative': {'loss': 'nope'}}, [], ["stimulative.loss: got 'nope'"]),
    ('model_without_adapter', {'model': 'mixer_s16_224', 'stimulative': ST}, [], ['MlpMixer']),
    ('space_does_not_fit', {'stimulative': {'sample_space': 'space3'}}, [], ["'space3'", 'sample_space']),
    ('existing_run', {}, [], ['already holds a run', 'old']),
    ('compile_mode_unknown', {'torchcompile': 'inductor', 'torchcompile_mode': 'turbo'}, [],
     ["torchcompile_mode: got 'turbo'", 'max-autotune']),
    ('compile_mode_without_inductor', {'torchcompile': 'aot_eager', 'torchcompile_mode': 'reduce-overhead'}, [],
     ["'reduce-overhead' is an inductor mode", "'aot_eager'"]),
    ('lr_not_a_number', {'lr': 'fast'}, [], ["'lr'", 'expected a number', "'fast'"], CLI),
    ('stop_epoch_after_last', {}, ['--stop-epoch', '3'], ['stop_epoch 3 is after the last epoch'], CLI),
    ('stop_epoch_0', {}, ['--stop-epoch', '0'], ['stop_epoch must be >= 1'], CLI),
    ('max_nonfinite_steps_negative', {}, ['--max-nonfinite-steps', '-1'], ['max_nonfinite_steps must be >= 0'], CLI),
    ('stimulative_override_bad', {}, ['--stimulative', 'num_subnets=-1'], ['stimulative.num_subnets', '-1'], CLI),
    ('input_size_scalar', {'input_size': 16}, [], ["'input_size'", 'list of 3'], CLI),
    ('train_img_sizes_unknown_to_train_py', {'train_img_sizes': [12]}, [],
     ["'train_img_sizes'", 'upgrade timm\'s train.py', 'timm-st train'], HOOK),
    ('kd_with_stimulative', {'kd_model_name': 'resnet20_cifar', 'stimulative': ST}, [], ['kd_model_name'], HOOK),
    ('eval_subnets_on_train_py', {'eval_subnets': 5}, [], ['eval_subnets', 'timm-st analyze'], HOOK),
    ('task_of_patched_train_py', {'task': 'mypkg:Task'}, [], ["'mypkg:Task'", '--task'], HOOK),
]
CASES = [c if len(c) == 5 else (*c, BOTH) for c in CASES]
PARAMS = [pytest.param(case, route, id=f'{case[0]}-{route}') for case in CASES for route in case[4]]


def _resolve(values, data_dir, bad, ckpts):
    out = []
    for v in values:
        if isinstance(v, str) and v.startswith('BAD/'):
            v = str(bad / v[4:])
        elif isinstance(v, str) and v.startswith('CKPT/'):
            v = ckpts[v[5:]]
        out.append(v)
    return out


@pytest.mark.parametrize('case,route', PARAMS)
def test_bad_input_refused_before_any_work(tmp_path, capsys, image_folder, bad_data, checkpoints, output,
                                           no_training, case, route):
    name, keys, extra, words, _ = case
    if name == 'device_cuda' and torch.cuda.is_available():
        pytest.skip('a CUDA device is available here')
    extra = _resolve(extra, image_folder, bad_data, checkpoints)
    if '--data-dir' not in extra:
        extra = ['--data-dir', str(image_folder), *extra]
    experiment = 'old' if name == 'existing_run' else 'new'
    before = snapshot(output)
    runner = run_cli if route == 'cli' else run_hook
    code, err = runner(tmp_path, capsys, keys, extra, experiment=experiment)
    assert code == 2, err
    line = one_line(err, 'timm-st train: error: ' if route == 'cli' else 'timm_st: error: ')
    for word in words:
        assert word in line, (word, line)
    assert snapshot(output) == before


def test_the_stand_in_and_the_cli_train_on_the_same_valid_recipe(tmp_path, capsys, image_folder, output):
    """The negative cases above are refusals of runs that otherwise start: the same base recipe trains."""
    code, err = run_hook(tmp_path, capsys, {'stimulative': ST}, ['--data-dir', str(image_folder)])
    assert code == 0, err
    code, err = run_cli(tmp_path, capsys, {'stimulative': ST}, ['--data-dir', str(image_folder)], experiment='cli')
    assert code == 0, err


def test_workers_0_refused_where_timms_loader_rejects_it(tmp_path, capsys, image_folder, output, monkeypatch):
    # timm before 1.0.29 hands persistent_workers=True with num_workers=0 to torch's DataLoader, which refuses
    from timm import data
    original = data.create_loader

    def old_create_loader(*a, num_workers=1, persistent_workers=True, **k):
        if persistent_workers and num_workers == 0:
            raise ValueError('persistent_workers option needs num_workers > 0')
        return original(*a, num_workers=num_workers, persistent_workers=persistent_workers, **k)

    monkeypatch.setattr(data, 'create_loader', old_create_loader)
    before = snapshot(output)
    code, err = run_hook(tmp_path, capsys, {'workers': 0}, ['--data-dir', str(image_folder)])
    assert code == 2 and 'workers: 0' in one_line(err, 'timm_st: error: ') and '--workers 1' in err
    assert snapshot(output) == before
    assert validation_module._loader_takes_zero_workers() is False


def test_resume_inside_the_run_folder_is_not_refused_by_the_hook(tmp_path, capsys, image_folder, checkpoints):
    folder = tmp_path / 'out' / 'run'
    folder.mkdir(parents=True)
    (folder / 'last.pth.tar').write_bytes(Path(checkpoints['same']).read_bytes())
    code, err = run_hook(tmp_path, capsys, {}, ['--data-dir', str(image_folder), '--resume',
                                                str(folder / 'last.pth.tar')], experiment='run')
    assert code == 0, err


# --- numeric strings and the config loader conventions (timm 1.0.31's train.py) -------------------------------

def test_numeric_strings_converted_on_timm_st_train(tmp_path):
    path = write_recipe(tmp_path / 'r.yaml', {'lr': '3e-4', 'epochs': '10', 'mean': ['0.5', 0.4, '0.3']})
    args, _ = parse_args(['-c', path])
    assert args.lr == 3e-4 and args.epochs == 10 and args.mean == [0.5, 0.4, 0.3]
    assert isinstance(args.epochs, int) and all(isinstance(m, float) for m in args.mean)


def test_numeric_strings_converted_on_the_hook(tmp_path, image_folder, monkeypatch):
    path = write_recipe(tmp_path / 'r.yaml', {**RECIPE, 'lr': '3e-4', 'mean': ['0.5', 0.4, '0.3'], 'std': [0.2]})
    module = stand_in(tmp_path, monkeypatch, ['-c', path, '--data-dir', str(image_folder)], activate=None)
    args = module._parse_args()
    assert args.mean == ['0.5', 0.4, '0.3']  # what train.py's own loader leaves for a list option
    hook.validate_run(module, args)
    assert args.lr == 3e-4 and args.mean == [0.5, 0.4, 0.3] and args.std == [0.2]


def test_command_line_values_win_over_recipe_values_on_the_hook(tmp_path, image_folder, monkeypatch):
    path = write_recipe(tmp_path / 'r.yaml', {**RECIPE, 'mean': ['0.5', 0.4, '0.3']})
    module = stand_in(tmp_path, monkeypatch, ['-c', path, '--data-dir', str(image_folder),
                                              '--mean', '0.1', '0.2', '0.3'], activate=None)
    args = module._parse_args()
    hook.validate_run(module, args)
    assert args.mean == [0.1, 0.2, 0.3]


@pytest.mark.parametrize('keys,words', [
    ({'lr': 'fast'}, ["'lr'", 'a number', "'fast'"]),
    ({'epochs': '1e3'}, ["'epochs'", 'an integer']),
    ({'input_size': 224}, ["'input_size'", 'list of 3']),
    ({'decay_milestones': [1, 'x']}, ["'decay_milestones'", 'integers']),
    ({'eval_metric': 'top3'}, ["'eval_metric'", "'top3'", 'top1']),
    ({'amp': 'yes'}, ["'amp'", 'true or false']),
    ({'model_kwargs': 'zero_init_last=false'}, ["'model_kwargs'", 'mapping']),
])
def test_invalid_values_rejected(tmp_path, keys, words):
    path = write_recipe(tmp_path / 'r.yaml', keys)
    with pytest.raises(RunError) as info:
        parse_args(['-c', path])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --- stimulative keys on the command line ----------------------------------------------------------------------

def test_stimulative_overrides_single_keys(tmp_path):
    path = write_recipe(tmp_path / 'r.yaml', {'stimulative': {'num_subnets': 6, 'loss': 'kl', 'temperature': 2.0}})
    args, config = parse_args(['-c', path, '--stimulative', 'num_subnets=2', 'loss=kl_direction', 'amplitude=1.5'])
    assert config == StimulativeConfig(num_subnets=2, loss='kl_direction', temperature=2.0, amplitude=1.5)
    assert args.stimulative == {'num_subnets': 2, 'loss': 'kl_direction', 'temperature': 2.0, 'amplitude': 1.5}
    args, config = parse_args(['--stimulative', 'sample_space={max_drop: [1, 2]}'])  # no section: defaults + keys
    assert config == StimulativeConfig(sample_space={'max_drop': (1, 2)})
    args, config = parse_args([])
    assert config is None and args.stimulative is None


@pytest.mark.parametrize('argv,words', [
    (['--stimulative', 'num_subnets=-1'], ['stimulative.num_subnets', '-1']),
    (['--stimulative', 'num_subnet=2'], ["unknown key(s) ['num_subnet']"]),
    (['--stimulative', 'num_subnets'], ['--stimulative', 'key=value', "'num_subnets'"]),
    (['--stimulative', 'loss=kl_direction', 'amplitude=0'], ['stimulative.amplitude', '> 0']),
])
def test_stimulative_overrides_validated_like_the_recipe(argv, words):
    with pytest.raises(RunError) as info:
        parse_args(argv)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_stimulative_override_refused_before_any_work(tmp_path, capsys, image_folder, output, no_training):
    before = snapshot(output)
    code, err = run_cli(tmp_path, capsys, {}, ['--data-dir', str(image_folder), '--stimulative', 'coef=-1'])
    assert code == 2 and 'stimulative.coef' in one_line(err, 'timm-st train: error: ')
    assert snapshot(output) == before


def test_help_lists_every_stimulative_key_with_meaning_and_default():
    text = build_parser().format_help()
    assert '--stimulative KEY=VALUE' in text
    for field in StimulativeConfig.__dataclass_fields__.values():
        assert f'{field.name} [{field.default}]:' in text, field.name
    assert 'sub-networks sampled per training step' in text


def test_every_stimulative_key_has_a_description():
    from timm_st.method.config import DESCRIPTIONS
    assert set(DESCRIPTIONS) == set(StimulativeConfig.__dataclass_fields__)


# --- what the config says about the run ------------------------------------------------------------------------

@pytest.mark.parametrize('section,common', [
    ({'num_subnets': 0}, True),
    ({'num_subnets': 0, 'loss': 'kl_direction'}, False),  # the main criterion sees layer-normalised logits
    ({'num_subnets': 1}, False),
    ({'num_subnets': 2, 'coef': 0}, True),
    ({'num_subnets': 2, 'coef': 0, 'loss': 'kl_direction'}, False),
])
def test_is_common_training(section, common):
    assert StimulativeConfig.from_dict(section).is_common_training is common


PATCHED_TRAIN_PY = FAKE_TRAIN_PY.replace(
    "parser.add_argument('--device-modules', nargs='+', default=None)\n",
    "parser.add_argument('--device-modules', nargs='+', default=None)\n"
    "parser.add_argument('--task', default=None)\n"
    "parser.add_argument('--task-kwargs', nargs='*', default={})\n")


@pytest.mark.parametrize('keys,words', [
    ({'weight_decy': 0.1}, ["'weight_decy'"]),
    ({'task_kwargs': {'num_subnets': -1}}, ['stimulative.num_subnets', '-1']),
    ({'lr': math.nan}, ['lr must be']),
])
def test_patched_task_route_validated_the_same(tmp_path, capsys, monkeypatch, image_folder, output, keys, words):
    """train.py with the --task option (patches/): importing the hook (as --task resolution does) validates."""
    assert '--task' in PATCHED_TRAIN_PY
    path = write_recipe(tmp_path / 'r.yaml', {**RECIPE, 'task': hook.FACTORY_PATH, 'stimulative': ST, **keys})
    monkeypatch.setattr(sys, 'argv', ['train.py', '-c', path, '--data-dir', str(image_folder), '--output',
                                      str(output), '--experiment', 'new'])
    module = fake_train_module(tmp_path, None, activate=hook.activate, source=PATCHED_TRAIN_PY)
    before = snapshot(output)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 2 and module.events == []
    line = one_line(capsys.readouterr().err, 'timm_st: error: ')
    for word in words:
        assert word in line, (word, line)
    assert snapshot(output) == before
