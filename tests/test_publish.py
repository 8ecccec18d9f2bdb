"""`timm-st publish`: a tiny trained run exported with --local-dir loads in plain timm (no timm_st) with the
same logits; the card holds the run's numbers and recipe; EMA / plain and best / last choose the weights;
every error is clean. Pushing is tested against a stand-in for `huggingface_hub.HfApi` (no network)."""
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import huggingface_hub
import timm
from timm_st.commands.publish import main
from timm_st.runs import publish as publish_module
from timm_st.runs.errors import RunError
from timm_st.runs.options import LOCAL_KEYS
from timm_st.runs.publish import export_checkpoint, publish
from timm_st.runs.recipe import parse_args
from timm_st.commands.train import main as train_main

REPO = 'org/resnet18.st_test'
COMMON = ['--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8', '--warmup-epochs', '0', '--lr', '0.05',
          '--workers', '0', '--device', 'cpu', '--hflip', '0', '--color-jitter', '0', '--no-prefetcher',
          '--log-interval', '100']


@pytest.fixture(scope='module')
def st_run(tmp_path_factory, image_folder):
    """resnet18 (a timm architecture), ST with 2 sub-networks, EMA kept, 2 epochs."""
    root = tmp_path_factory.mktemp('runs')
    recipe = root / 'st_tiny.yaml'
    recipe.write_text('# tiny ST recipe for the publish test\n'
                      'stimulative:\n  num_subnets: 2\n  input_scale: [0.5, 1.0]\n')
    assert train_main(['-c', str(recipe), '--model', 'resnet18', '--data-dir', str(image_folder), '--output',
                       str(root), '--experiment', 'st', '--epochs', '2', '--eval-subnets', '3', '--model-ema',
                       '--model-ema-decay', '0.5'] + COMMON) == 0
    return root / 'st'


@pytest.fixture(scope='module')
def ct_cifar_run(tmp_path_factory, image_folder):
    """resnet20_cifar (registered by timm_st), common training, no EMA, 1 epoch."""
    root = tmp_path_factory.mktemp('runs_ct')
    assert train_main(['--model', 'resnet20_cifar', '--data-dir', str(image_folder), '--output', str(root),
                       '--experiment', 'ct', '--epochs', '1', '--eval-subnets', '2'] + COMMON) == 0
    return root / 'ct'


def copy_run(run, tmp_path):
    dst = tmp_path / 'run_copy'
    shutil.copytree(run, dst)
    return dst


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def card_parts(folder):
    text = (folder / 'README.md').read_text()
    assert text.startswith('---\n')
    front, body = text[4:].split('\n---\n', 1)
    return yaml.safe_load(front), body


def summary_rows(run):
    import csv
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if '.tmp-' in p.name or '.old-' in p.name]


# --------------------------------------------------------------------------------------------------
# round trip

_LOADER = textwrap.dedent('''
    import json, sys
    class _Block:  # make `import timm_st` fail, as in an environment without timm-st
        def find_spec(self, name, path=None, target=None):
            if name == 'timm_st' or name.startswith('timm_st.'):
                raise ImportError('timm_st is not installed here')
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import timm_st
    except ImportError:
        pass
    else:
        raise SystemExit('timm_st is importable')
    import safetensors.torch, timm, torch
    ref, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    data = torch.load(ref)
    out = {}
    for name in sys.argv[4:]:
        model = timm.create_model(name, pretrained=True).eval()   # timm loads strictly
        weights = safetensors.torch.load_file(folder + '/model.safetensors')
        assert set(weights) == set(model.state_dict()), 'state dict keys differ'
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            logits = model(data['x'])
        cfg = timm.data.resolve_model_data_config(model)
        out[name] = dict(equal=bool(torch.equal(logits, data['logits'])),
                         max_diff=float((logits - data['logits']).abs().max()),
                         input_size=list(cfg['input_size']), crop_pct=cfg['crop_pct'],
                         interpolation=cfg['interpolation'], mean=list(cfg['mean']),
                         labels=model.pretrained_cfg.get('label_names'), num_classes=model.num_classes)
    assert 'timm_st' not in sys.modules
    print(json.dumps(out))
''')


def _hub_cache(folder, cache, repo_id):
    """An offline Hugging Face cache holding `folder` as the main revision of `repo_id`."""
    commit = 'a' * 40
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    shutil.copytree(folder, repo / 'snapshots' / commit)


def test_round_trip_in_plain_timm(st_run, tmp_path):
    out = export_checkpoint(st_run, tmp_path / 'export', repo_id=REPO)
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'recipe.yaml']
    checkpoint = load_checkpoint(st_run / 'model_best.pth.tar')
    model = timm.create_model('resnet18', num_classes=3)
    model.load_state_dict(checkpoint['state_dict'], strict=True)
    model.eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    torch.save({'x': x, 'logits': logits}, tmp_path / 'ref.pt')

    cache = tmp_path / 'hf_cache'
    _hub_cache(out, cache, REPO)
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache),
               PYTHONPATH='')  # nothing of the repository on the path
    proc = subprocess.run(
        [sys.executable, '-c', _LOADER, str(tmp_path / 'ref.pt'), str(out), str(torch.get_num_threads()),
         f'local-dir:{out}', f'hf-hub:{REPO}'],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in loaded.items():
        assert result['equal'], (name, result['max_diff'])
        assert result['input_size'] == [3, 16, 16] and result['crop_pct'] == 1.0
        assert result['labels'] == ['class0', 'class1', 'class2'] and result['num_classes'] == 3
    args = yaml.safe_load((st_run / 'args.yaml').read_text())
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and config['num_classes'] == 3
    assert config['label_names'] == ['class0', 'class1', 'class2']
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, 16, 16] and cfg['crop_pct'] == args['crop_pct'] == 1.0
    assert 'tag' not in cfg and 'paper_ids' not in cfg  # nothing of resnet18.a1_in1k's provenance
    assert cfg['license'] == 'apache-2.0'


def test_card_holds_numbers_recipe_and_metadata(st_run, tmp_path):
    out = export_checkpoint(st_run, tmp_path / 'export', repo_id=REPO)
    front, body = card_parts(out)
    assert front['library_name'] == 'timm' and front['pipeline_tag'] == 'image-classification'
    assert {'image-classification', 'timm', 'stimulative-training'} <= set(front['tags'])
    assert front['license'] == 'apache-2.0'
    assert 'datasets' not in front  # an anonymous image folder has no hub dataset id
    results = json.loads((st_run / 'results.json').read_text())
    checkpoint = load_checkpoint(st_run / 'model_best.pth.tar')
    row = [r for r in summary_rows(st_run) if int(r['epoch']) == checkpoint['epoch']][0]
    assert f'**{float(row["eval_top1"]):.2f}**' in body  # (top-5 of 3 classes is 100% whatever the weights)
    for bn in ('running', 'recalibrate'):
        subnets = results['subnets'][bn]
        assert f'{subnets["top1_mean"]:.2f} +- {subnets["top1_std"]:.2f}' in body
    assert 'plain (non-EMA) weights of the best checkpoint (`model_best.pth.tar`' in body
    # recipe: the original file verbatim, the resolved arguments, and the ST settings
    assert '# tiny ST recipe for the publish test' in body
    recipe = (out / 'recipe.yaml').read_text()
    assert recipe.split('\n', 3)[3].rstrip() in body
    assert 'input_scale: [0.5, 1.0]' in body and 'num_subnets: 2' in body
    assert 'random smaller inputs for sub-networks' in body  # an ST++ strategy
    # cost and reproduction
    rates = [float(r['train_img_per_sec']) for r in summary_rows(st_run)]
    assert f'{sum(rates) / len(rates):.1f} training images/s' in body
    assert '- **Epochs:** 2' in body and '1 x cpu' in body
    assert f'hf download {REPO} recipe.yaml' in body and 'timm-st train -c recipe.yaml' in body
    # citations of both papers, usage with plain timm
    assert 'Stimulative training of residual networks: A social psychology perspective of loafing' in body
    assert 'arXiv:2305.02507' in body and '@article{ye2023stimulative' in body
    assert f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in body
    assert 'import timm_st' not in body
    assert body.startswith('# Model card for resnet18.st_test')


def test_recipe_yaml_trains_the_same_run(st_run, tmp_path):
    out = export_checkpoint(st_run, tmp_path / 'export')
    args, config = parse_args(['-c', str(out / 'recipe.yaml'), '--data-dir', 'somewhere'])
    original = yaml.safe_load((st_run / 'args.yaml').read_text())
    local = set(LOCAL_KEYS)
    for key, value in vars(args).items():
        if key in original and key not in local:
            assert value == original[key], key
    assert config.num_subnets == 2 and config.input_scale == (0.5, 1.0)
    for key in ('data_dir', 'output', 'experiment', 'device'):
        assert f'\n{key}:' not in (out / 'recipe.yaml').read_text()


def test_ema_and_plain_weights(st_run, tmp_path):
    checkpoint = load_checkpoint(st_run / 'model_best.pth.tar')
    plain = export_checkpoint(st_run, tmp_path / 'plain')
    ema = export_checkpoint(st_run, tmp_path / 'ema', ema=True)
    plain_w, ema_w = load_file(plain / 'model.safetensors'), load_file(ema / 'model.safetensors')
    assert any(not torch.equal(plain_w[k], ema_w[k]) for k in plain_w)
    for name, tensor in checkpoint['state_dict'].items():
        assert torch.equal(plain_w[name], tensor)
        assert torch.equal(ema_w[name], checkpoint['state_dict_ema'][name])
    _, plain_card = card_parts(plain)
    _, ema_card = card_parts(ema)
    assert '**Weights:** plain (non-EMA) weights' in plain_card
    assert '**Weights:** EMA weights' in ema_card
    row = [r for r in summary_rows(st_run) if int(r['epoch']) == checkpoint['epoch']][0]
    epoch = checkpoint['epoch'] + 1
    assert f'| **Full network (published)** | EMA, epoch {epoch} | **{float(row["eval_ema_top1"]):.2f}**' in ema_card
    assert 'not on the published weights' in ema_card


def test_best_and_last_checkpoints(st_run, tmp_path):
    run = copy_run(st_run, tmp_path)
    shutil.copy(run / 'checkpoint-0.pth.tar', run / 'model_best.pth.tar')  # as if epoch 0 had been the best
    best = export_checkpoint(run, tmp_path / 'best', checkpoint='best')
    last = export_checkpoint(run, tmp_path / 'last', checkpoint='last')
    named = export_checkpoint(run, tmp_path / 'named', checkpoint='checkpoint-0.pth.tar')
    for folder, source in ((best, 'checkpoint-0.pth.tar'), (last, 'last.pth.tar'), (named, 'checkpoint-0.pth.tar')):
        weights = load_file(folder / 'model.safetensors')
        for name, tensor in load_checkpoint(run / source)['state_dict'].items():
            assert torch.equal(weights[name], tensor), (folder.name, name)
    assert not torch.equal(load_file(best / 'model.safetensors')['fc.weight'],
                           load_file(last / 'model.safetensors')['fc.weight'])
    rows = summary_rows(run)
    _, best_card = card_parts(best)
    _, last_card = card_parts(last)
    assert 'the best checkpoint (`model_best.pth.tar`, epoch 1 of 2)' in best_card
    assert f'| plain, epoch 1 | **{float(rows[0]["eval_top1"]):.2f}**' in best_card
    assert 'not on the published weights' in best_card  # sub-networks were measured on the last weights
    assert 'the last checkpoint (`last.pth.tar`, epoch 2 of 2)' in last_card
    assert f'| plain, epoch 2 | **{float(rows[1]["eval_top1"]):.2f}**' in last_card
    assert 'not on the published weights' not in last_card


def test_dataset_metadata(st_run, tmp_path):
    run = copy_run(st_run, tmp_path)
    args = yaml.safe_load((run / 'args.yaml').read_text())
    args['dataset'] = 'torch/cifar100'
    (run / 'args.yaml').write_text(yaml.safe_dump(args))
    front, body = card_parts(export_checkpoint(run, tmp_path / 'cifar'))
    assert front['datasets'] == ['cifar100'] and '**Dataset:** cifar100' in body
    front, _ = card_parts(export_checkpoint(run, tmp_path / 'named', dataset_id='me/my-data', license='mit'))
    assert front['datasets'] == ['me/my-data'] and front['license'] == 'mit'


def test_timm_st_model_card_says_import_timm_st(ct_cifar_run, tmp_path):
    out = export_checkpoint(ct_cifar_run, tmp_path / 'export')
    front, body = card_parts(out)
    assert 'import timm_st  # registers resnet20_cifar with timm' in body
    assert 'needs `import timm_st`' in body
    assert 'stimulative-training' not in front['tags'] and 'common training' in body
    import timm_st  # noqa: F401  (registers the architecture)
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    checkpoint = load_checkpoint(ct_cifar_run / 'model_best.pth.tar')
    for name, tensor in checkpoint['state_dict'].items():
        assert torch.equal(model.state_dict()[name], tensor)


# --------------------------------------------------------------------------------------------------
# errors: clear message, non-zero exit, nothing written

def _fails(argv, capsys, expected, dest):
    assert main([str(a) for a in argv]) != 0
    err = capsys.readouterr().err
    assert 'timm-st publish: error:' in err and expected in err, err
    assert not dest.exists()
    assert no_leftovers(dest.parent) == []


def test_missing_output_dir(tmp_path, capsys):
    _fails([tmp_path / 'nope', '--local-dir', tmp_path / 'out'], capsys, 'does not exist', tmp_path / 'out')


def test_no_checkpoint(st_run, tmp_path, capsys):
    run = copy_run(st_run, tmp_path)
    (run / 'model_best.pth.tar').unlink()
    _fails([run, '--local-dir', tmp_path / 'out'], capsys, 'no checkpoint', tmp_path / 'out')
    for path in run.glob('*.pth.tar'):
        path.unlink()
    _fails([run, '--local-dir', tmp_path / 'out', '--checkpoint', 'last'], capsys, 'holds no checkpoint',
           tmp_path / 'out')


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_corrupt_checkpoint(st_run, tmp_path, capsys, damage):
    run = copy_run(st_run, tmp_path)
    path = run / 'model_best.pth.tar'
    data = path.read_bytes()
    path.unlink()  # checkpoints are hard links of each other; do not damage the others
    path.write_bytes(data[:len(data) // 2] if damage == 'truncated' else b'not a checkpoint' * 10)
    _fails([run, '--local-dir', tmp_path / 'out'], capsys, 'corrupt', tmp_path / 'out')


def test_no_results_file(st_run, tmp_path, capsys):
    run = copy_run(st_run, tmp_path)
    (run / 'results.json').unlink()
    _fails([run, '--local-dir', tmp_path / 'out'], capsys, 'no results file', tmp_path / 'out')


def test_ema_without_ema_weights(ct_cifar_run, tmp_path, capsys):
    _fails([ct_cifar_run, '--local-dir', tmp_path / 'out', '--ema'], capsys, 'holds no EMA weights', tmp_path / 'out')


def test_local_dir_that_is_or_is_inside_a_file(st_run, tmp_path, capsys):
    a_file = tmp_path / 'a_file'
    a_file.write_text('mine')
    for dest in (a_file, a_file / 'export'):
        assert main([str(st_run), '--local-dir', str(dest)]) == 2  # bad input, not a traceback
        err = capsys.readouterr().err.strip()
        assert err.startswith('timm-st publish: error: --local-dir') and 'is a file, not a folder' in err, err
        assert len(err.splitlines()) == 1
    assert a_file.read_text() == 'mine' and no_leftovers(tmp_path) == []


def test_existing_local_dir_needs_overwrite(st_run, tmp_path, capsys):
    dest = tmp_path / 'out'
    dest.mkdir()
    (dest / 'keep.txt').write_text('mine')
    assert main([str(st_run), '--local-dir', str(dest)]) == 2  # bad input
    assert 'not empty' in capsys.readouterr().err
    assert [p.name for p in dest.iterdir()] == ['keep.txt']
    assert main([str(st_run), '--local-dir', str(dest), '--overwrite']) == 0
    assert sorted(p.name for p in dest.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'recipe.yaml']
    assert no_leftovers(tmp_path) == []
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert main([str(st_run), '--local-dir', str(empty)]) == 0  # an empty folder is fine
    with pytest.raises(RunError, match='training output folder'):
        export_checkpoint(st_run, st_run.parent, overwrite=True)


def test_failure_while_writing_leaves_nothing(st_run, tmp_path, capsys, monkeypatch):
    def broken(model, folder, **kwargs):
        (folder / 'model.safetensors').write_bytes(b'partial')
        raise RunError('disk full (simulated)')
    monkeypatch.setattr(publish_module, 'save_for_hf', broken)
    _fails([st_run, '--local-dir', tmp_path / 'out'], capsys, 'disk full', tmp_path / 'out')
    dest = tmp_path / 'existing'
    dest.mkdir()
    (dest / 'keep.txt').write_text('mine')
    assert main([str(st_run), '--local-dir', str(dest), '--overwrite']) == 2  # bad input
    assert [p.name for p in dest.iterdir()] == ['keep.txt']  # the old export is still whole
    assert no_leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# pushing, against a stand-in for HfApi (no network)

_REAL_API = huggingface_hub.HfApi


class FakeApi:
    """A stand-in for `huggingface_hub.HfApi` that records its calls; every call is bound to the real method's
    signature first, so a keyword or argument the installed huggingface_hub does not take fails as it would."""
    exists = False
    fail = None  # (method name, exception)
    calls = []

    def __init__(self, *args, **kwargs):
        self.calls.append(('init', self._bind('__init__', args, kwargs)['token']))

    def _bind(self, name, args, kwargs):
        bound = inspect.signature(getattr(_REAL_API, name)).bind(self, *args, **kwargs)  # TypeError as the real one
        bound.apply_defaults()
        if self.fail and self.fail[0] == name:
            raise self.fail[1]
        return bound.arguments

    def repo_exists(self, *args, **kwargs):
        a = self._bind('repo_exists', args, kwargs)
        self.calls.append(('repo_exists', a['repo_id']))
        return self.exists

    def create_repo(self, *args, **kwargs):
        a = self._bind('create_repo', args, kwargs)
        self.calls.append(('create_repo', a['repo_id'], a['private'], a['exist_ok']))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{a["repo_id"]}')

    def create_branch(self, *args, **kwargs):
        a = self._bind('create_branch', args, kwargs)
        self.calls.append(('create_branch', a['repo_id'], a['branch']))

    def upload_folder(self, *args, **kwargs):
        a = self._bind('upload_folder', args, kwargs)
        folder = Path(a['folder_path'])
        files = {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}
        self.calls.append(('upload_folder', a['repo_id'], files, a))


@pytest.fixture
def fake_hub(monkeypatch):
    class Api(FakeApi):
        calls = []
    monkeypatch.setattr(huggingface_hub, 'HfApi', Api)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_fake')  # the real one takes no arguments
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return Api


def test_push_uploads_the_local_export(st_run, tmp_path, fake_hub, capsys):
    assert main([str(st_run), '--repo-id', REPO, '--ema', '--private', '--revision', 'v1']) == 0
    assert f'https://huggingface.co/{REPO}' in capsys.readouterr().out
    names = [c[0] for c in fake_hub.calls]
    assert names == ['init', 'repo_exists', 'create_repo', 'create_branch', 'upload_folder']
    assert fake_hub.calls[0] == ('init', 'hf_fake')
    assert fake_hub.calls[2] == ('create_repo', REPO, True, False)
    _, repo_id, files, kwargs = fake_hub.calls[-1]
    assert kwargs['revision'] == 'v1' and 'EMA' in kwargs['commit_message']
    local = export_checkpoint(st_run, tmp_path / 'same', ema=True, repo_id=REPO)
    assert files == {p.name: p.read_bytes() for p in local.iterdir()}  # --local-dir is exactly what is pushed


def test_push_into_existing_repo_needs_overwrite(st_run, fake_hub, capsys):
    fake_hub.exists = True
    assert main([str(st_run), '--repo-id', REPO]) == 2  # bad input
    assert 'already exists' in capsys.readouterr().err
    assert [c[0] for c in fake_hub.calls] == ['init', 'repo_exists']
    assert main([str(st_run), '--repo-id', REPO, '--overwrite']) == 0
    create = [c for c in fake_hub.calls if c[0] == 'create_repo'][0]
    assert create[3] is True  # exist_ok
    upload = [c for c in fake_hub.calls if c[0] == 'upload_folder'][0]
    assert '*.safetensors' in upload[3]['delete_patterns']  # stale weights are replaced


def test_push_without_token(st_run, fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    assert main([str(st_run), '--repo-id', REPO]) == 2  # bad input
    assert 'no Hugging Face token' in capsys.readouterr().err
    assert fake_hub.calls == []  # checked before any work


@pytest.mark.parametrize('where', ['repo_exists', 'create_repo', 'upload_folder'])
def test_push_network_failure(st_run, fake_hub, capsys, where):
    fake_hub.fail = (where, ConnectionError('Failed to resolve huggingface.co'))
    assert main([str(st_run), '--repo-id', REPO]) == 1
    err = capsys.readouterr().err
    assert 'could not' in err and 'Failed to resolve huggingface.co' in err and 'network' in err
    assert 'Traceback' not in err


def test_push_bad_repo_id(st_run, fake_hub, capsys):
    assert main([str(st_run), '--repo-id', 'no-owner']) == 2  # bad input
    assert 'ORG_OR_USER/NAME' in capsys.readouterr().err
    with pytest.raises(RunError, match='not a valid repository id'):
        publish(st_run, 'bad//id')


# the method is named from the settings, never from the recipe's file name
@pytest.mark.parametrize('stimulative,tag', [
    (None, 'ct'),
    ({'num_subnets': 0}, 'ct'),
    ({'num_subnets': 1, 'coef': 0.0}, 'ct'),
    ({'num_subnets': 0, 'loss': 'kl_direction'}, 'ctnorm'),  # main logits layer-normalised: not CT
    ({'num_subnets': 1}, 'st'),
    ({'num_subnets': 1, 'sample_space': {'max_drop': [4, 4, 4]}}, 'st'),  # a narrowed space alone is not ST++
    ({'num_subnets': 1, 'loss': 'kl_direction'}, 'stpp'),
    ({'num_subnets': 6}, 'stpp'),
    ({'num_subnets': 1, 'input_scale': [0.43, 1.0]}, 'stpp'),
    ({'num_subnets': 1, 'sample_space': 'space3'}, 'stpp'),
])
def test_method_named_from_settings(stimulative, tag):
    from timm_st.method.config import describe_method as _method
    assert _method(stimulative)[0] == tag


def test_demo_recipes_are_named_by_their_settings():
    from timm_st.method.config import describe_method as _method
    root = Path(__file__).parent.parent / 'recipes'
    assert _method(yaml.safe_load((root / 'demo_digits.yaml').read_text())['stimulative'])[0] == 'st'
    assert _method(yaml.safe_load((root / 'st_r50.yaml').read_text())['stimulative'])[0] == 'stpp'


def test_exports_a_run_of_timm_train_py(tmp_path):
    """A folder written by timm's train.py (no results.json, EMA metrics in its eval columns) publishes too."""
    from test_run_folder import _train_py_folder
    folder, model = _train_py_folder(tmp_path, ema=True)
    out = export_checkpoint(folder, tmp_path / 'export', ema=True)
    card = (out / 'README.md').read_text()
    assert 'Evaluated by `train.py` on the validation split' in card
    assert '| **Full network (published)** | EMA, epoch 2 | **60.00** | 100.00 |' in card
    assert '| Full network | plain' not in card  # train.py did not record the plain weights' accuracy


UNREACHABLE_HUB = '''
import logging, sys
import huggingface_hub
class Unreachable(huggingface_hub.HfApi):  # what huggingface_hub logs while it retries, then its error
    def repo_exists(self, repo_id, **kwargs):
        logging.getLogger('huggingface_hub.utils._http').warning(sys.argv[1])
        raise ConnectionError('Failed to resolve huggingface.co (simulated)')
huggingface_hub.HfApi = Unreachable
from timm_st.commands.publish import main
sys.exit(main(sys.argv[2:]))
'''


def test_hub_warnings_printed_once(st_run):
    """An unreachable hub: each of huggingface_hub's retry warnings printed once (not also through the root handler
    timm-st's console adds), then one error line and exit code 1 (the hub failed, not the input)."""
    warning = "'[Errno 111] Connection refused' thrown while requesting HEAD (simulated) Retrying in 1s [Retry 1/5]."
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_TOKEN='hf_fake',
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH')])))
    proc = subprocess.run([sys.executable, '-c', UNREACHABLE_HUB, warning, str(st_run), '--repo-id', REPO],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count('Connection refused') == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('timm-st publish: error: could not check whether')
