"""Every recipe in recipes/ validates without training, and ST recipes differ from their
baselines only where the method requires."""
from pathlib import Path

import pytest
import timm

from timm_st import StimulativeTask
from timm_st.runs.recipe import load_recipe, parse_args
from timm_st.runs.validation import check_combinations

RECIPES = sorted((Path(__file__).resolve().parent.parent / 'recipes').glob('*.yaml'))

# (ST recipe, its baseline, keys allowed to differ)
PAIRS = [
    ('st_r50_st', 'ct_r50', {'stimulative'}),
    ('st_r50', 'ct_r50', {'stimulative', 'train_img_sizes', 'crop_pct'}),
    ('st_r50_ua', 'st_r50', {'aa', 'epochs'}),
    ('st_rsb_a1_r50', 'rsb_a1_r50', {'stimulative'}),
    ('st_rsb_a2_r50', 'rsb_a2_r50', {'stimulative'}),
    ('st_rsb_a3_r50', 'rsb_a3_r50', {'stimulative'}),
    ('st_resnet56_cifar100', 'ct_resnet56_cifar100', {'stimulative'}),
    ('st_resnet110_cifar100', 'ct_resnet110_cifar100', {'stimulative'}),
    ('demo_digits', 'demo_digits_ct', {'stimulative'}),
    ('demo_digits_bn_update', 'demo_digits', {'stimulative'}),
    ('demo_digits_lite', 'demo_digits', {'stimulative'}),
]


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {name for pair in PAIRS for name in pair[:2]} <= names


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    text = path.read_text()
    assert text.startswith('#'), 'a recipe starts with a comment: what it reproduces, expected result, hardware'
    args, config = parse_args(['-c', str(path), '--data-dir', '/data'])
    assert timm.is_model(args.model), args.model
    check_combinations(args, config)  # e.g. no kl_direction with bce_loss
    if config is not None:
        model = timm.create_model(args.model, num_classes=args.num_classes or 1000, **args.model_kwargs)
        task = StimulativeTask(model, config, num_epochs=args.epochs, verbose=False)  # adapter + space fit
        assert task.sampler is not None or config.num_subnets == 0


@pytest.mark.parametrize('st,base,allowed', PAIRS, ids=lambda v: v if isinstance(v, str) else '')
def test_st_recipe_differs_from_baseline_only_where_required(st, base, allowed):
    a, b = (load_recipe(str(Path(RECIPES[0].parent, name + '.yaml'))) for name in (st, base))
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differing <= allowed, f'{st} vs {base} also differ in {sorted(differing - allowed)}'
    assert 'stimulative' in differing or 'stimulative' not in allowed


def _eval_space(name):
    """The sampling space `timm-st train` evaluates sub-networks on for a recipe (as its results.json says)."""
    section = load_recipe(str(Path(RECIPES[0].parent, name + '.yaml'))).get('stimulative') or {}
    return section.get('sample_space', 'default') if section.get('sampler', 'ordered') == 'ordered' else None


# st_r50_st (default space) and st_r50 (space3) share the baseline ct_r50, which names st_r50's space
DIFFERENT_SPACE = {('st_r50_st', 'ct_r50')}


@pytest.mark.parametrize('st,base,allowed', PAIRS, ids=lambda v: v if isinstance(v, str) else '')
def test_twins_evaluate_the_same_subnetworks(st, base, allowed):
    if (st, base) in DIFFERENT_SPACE:
        assert _eval_space(st) != _eval_space(base)
        return
    assert _eval_space(st) == _eval_space(base), f'{base} must name the sample_space of {st}'


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_its_runners(path):
    header = ''.join(line for line in path.read_text().splitlines(True) if line.startswith('#'))
    recipe = load_recipe(str(path))
    assert 'train.py' in header and 'timm-st train' in header.replace('-m timm_st train', 'timm-st train')
    if 'train_img_sizes' in recipe:  # not an option of timm's train.py up to v1.0.28: the header says so
        assert 'newer than 1.0.28' in header
    assert 'ST_SPEC' not in path.read_text()
