"""Sampling spaces and sub-network samplers: the named spaces, the ordered and random samplers, their state."""
import io
import itertools

import pytest
import torch
import torch.nn as nn

import timm
import timm_st

from timm_st import (
    OrderedSubnetSampler, RandomSubnetSampler, Stage, SubnetPlan, resolve_sample_space, subnet_stages,
)
from timm_st.method.adapters import stage_depths

R50 = (3, 4, 6, 3)

# The spec's table: candidate drop counts (lo, hi) per stage for ResNet-50 (3, 4, 6, 3).
SPEC_SPACES = {
    'default': ((0, 2), (0, 3), (0, 5), (0, 2)),
    'space1': ((0, 1), (0, 2), (0, 4), (0, 1)),
    'space2': ((0, 1), (0, 2), (0, 5), (0, 2)),
    'space3': ((0, 0), (0, 1), (0, 3), (0, 0)),
    'space4': ((0, 0), (0, 1), (0, 4), (0, 1)),
    'space5': ((0, 0), (0, 0), (0, 2), (0, 0)),
    'space6': ((0, 0), (0, 1), (0, 3), (0, 1)),
    'space7': ((0, 0), (0, 2), (0, 4), (0, 0)),
}


def fake_stages(depths, non_droppable=()):
    """Stages of `nn.Identity` blocks; `non_droppable` lists (stage, block) pairs without a skip."""
    return [
        Stage(nn.Sequential(*[nn.Identity() for _ in range(d)]),
              tuple(i > 0 and (s, i) not in non_droppable for i in range(d)))
        for s, d in enumerate(depths)
    ]


def _drops(plan, depths):
    """Dropped tail length per stage of an ordered (prefix) plan."""
    for kept, d in zip(plan.blocks, depths):
        assert kept == tuple(range(len(kept))), f'not a prefix: {kept}'
    return tuple(d - len(kept) for kept, d in zip(plan.blocks, depths))


def _candidates(space):
    return set(itertools.product(*[range(lo, hi + 1) for lo, hi in space]))


@pytest.fixture(scope='module')
def r50_stages():
    return subnet_stages(timm.create_model('resnet50', pretrained=False))


# ---------------------------------------------------------------------------------------------
# Named spaces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(SPEC_SPACES))
def test_named_space_resolves_to_spec_table(name, r50_stages):
    expected = tuple(hi for _, hi in SPEC_SPACES[name])
    assert stage_depths(r50_stages) == R50
    assert resolve_sample_space(name, r50_stages) == expected
    assert resolve_sample_space(name, fake_stages(R50)) == expected


@pytest.mark.parametrize('name', list(SPEC_SPACES))
def test_ordered_sampler_hits_exactly_the_candidates(name, r50_stages):
    max_drop = resolve_sample_space(name, r50_stages)
    sampler = OrderedSubnetSampler(stage_depths(r50_stages), max_drop, seed=3)
    expected = _candidates(SPEC_SPACES[name])
    seen = set()
    # default has 3*4*6*3 = 216 candidates; 3000 draws miss one with probability ~1e-5
    for _ in range(3000 if len(expected) > 50 else 600):
        plan = sampler.sample()
        assert plan.input_size is None
        seen.add(_drops(plan, R50))
    assert seen == expected
    # the full network is one of the candidates
    assert (0, 0, 0, 0) in seen


def test_ordered_draws_are_roughly_uniform_per_stage():
    sampler = OrderedSubnetSampler(R50, (2, 3, 5, 2), seed=0)
    n = 3000
    counts = [[0] * (m + 1) for m in (2, 3, 5, 2)]
    for _ in range(n):
        for s, k in enumerate(_drops(sampler.sample(), R50)):
            counts[s][k] += 1
    for c in counts:
        for v in c:
            assert abs(v / n - 1 / len(c)) < 0.05, c


def test_default_space_on_other_layouts():
    resnet18 = subnet_stages(timm.create_model('resnet18', pretrained=False))
    assert resolve_sample_space('default', resnet18) == (1, 1, 1, 1)
    assert resolve_sample_space('default', fake_stages((3, 8, 36, 3))) == (2, 7, 35, 2)
    # default is limited to the trailing run of droppable blocks
    stages = fake_stages((3, 5), non_droppable={(1, 2)})
    assert resolve_sample_space('default', stages) == (2, 2)


# ---------------------------------------------------------------------------------------------
# Mappings
# ---------------------------------------------------------------------------------------------

def test_max_drop_mapping():
    stages = fake_stages(R50)
    assert resolve_sample_space({'max_drop': [1, 0, 4, 2]}, stages) == (1, 0, 4, 2)
    assert resolve_sample_space({'max_drop': (0, 0, 0, 0)}, stages) == (0, 0, 0, 0)
    sampler = OrderedSubnetSampler(R50, resolve_sample_space({'max_drop': [1, 0, 4, 2]}, stages), seed=1)
    seen = {_drops(sampler.sample(), R50) for _ in range(800)}
    assert seen == _candidates(((0, 1), (0, 0), (0, 4), (0, 2)))


def test_min_keep_mapping():
    stages = fake_stages(R50)
    assert resolve_sample_space({'min_keep': [3, 2, 2, 1]}, stages) == (0, 2, 4, 2)
    assert resolve_sample_space({'min_keep': [1, 1, 1, 1]}, stages) == resolve_sample_space('default', stages)
    # min_keep == depth means that stage is never cut
    assert resolve_sample_space({'min_keep': list(R50)}, stages) == (0, 0, 0, 0)


def _value_error(space, stages):
    with pytest.raises(ValueError) as info:
        resolve_sample_space(space, stages)
    return str(info.value)


def test_impossible_spaces_raise():
    stages = fake_stages(R50)
    # min_keep larger than a stage
    msg = _value_error({'min_keep': [1, 1, 17, 1]}, stages)
    assert 'sample_space' in msg and 'min_keep' in msg and '17' in msg
    msg = _value_error({'min_keep': [1, 5, 1, 1]}, stages)
    assert 'sample_space' in msg and '5' in msg
    # min_keep 0: the first block is always kept
    assert 'sample_space' in _value_error({'min_keep': [0, 1, 1, 1]}, stages)
    # max_drop >= depth
    msg = _value_error({'max_drop': [0, 0, 11, 0]}, stages)
    assert 'sample_space' in msg and '11' in msg
    msg = _value_error({'max_drop': [3, 0, 0, 0]}, stages)  # exactly the depth
    assert 'sample_space' in msg and 'asks for 3' in msg
    assert 'sample_space' in _value_error({'max_drop': [0, -1, 0, 0]}, stages)
    # wrong number of stages
    msg = _value_error({'max_drop': [1, 1, 1]}, stages)
    assert 'sample_space' in msg and '[1, 1, 1]' in msg
    msg = _value_error({'min_keep': [1, 1, 1, 1, 1]}, stages)
    assert 'sample_space' in msg and '[1, 1, 1, 1, 1]' in msg
    # max_drop reaching past a block without a skip connection
    msg = _value_error({'max_drop': [0, 0, 3, 0]}, fake_stages(R50, non_droppable={(2, 3)}))
    assert 'sample_space' in msg and '3' in msg
    # unknown name
    msg = _value_error('space99', stages)
    assert 'sample_space' in msg and 'space99' in msg


@pytest.mark.parametrize('name', [n for n in SPEC_SPACES if n != 'default'])
def test_named_space_on_wrong_layout_raises(name):
    resnet18 = subnet_stages(timm.create_model('resnet18', pretrained=False))
    msg = _value_error(name, resnet18)
    assert 'sample_space' in msg and repr(name) in msg and '[2, 2, 2, 2]' in msg


def test_ordered_sampler_rejects_bad_max_drop():
    with pytest.raises(ValueError):
        OrderedSubnetSampler(R50, (3, 0, 0, 0))
    with pytest.raises(ValueError):
        OrderedSubnetSampler(R50, (0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Determinism and checkpointing
# ---------------------------------------------------------------------------------------------

def _ordered(seed, input_scale=(0.43, 1.0)):
    return OrderedSubnetSampler(R50, (2, 3, 5, 2), input_scale=input_scale, seed=seed)


def _random(seed, input_scale=(0.43, 1.0)):
    return RandomSubnetSampler(fake_stages(R50), min_keep_prob=0.5, input_scale=input_scale, seed=seed)


def _draw(sampler, n, height=224):
    return [sampler.sample(height) for _ in range(n)]


@pytest.mark.parametrize('make', [_ordered, _random])
def test_seed_determinism(make):
    a = _draw(make(7), 50)
    b = _draw(make(7), 50)
    c = _draw(make(8), 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # plans are hashable and the sequence actually varies


@pytest.mark.parametrize('make', [_ordered, _random])
@pytest.mark.parametrize('through_file', [False, True])
def test_state_dict_resume_continues_sequence(make, through_file):
    reference = _draw(make(5), 40)

    first = make(5)
    head = _draw(first, 17)
    state = first.state_dict()
    _draw(first, 9)  # drawing on after saving must not alter the saved state
    if through_file:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)

    resumed = make(12345)  # a different seed: the state alone must carry the sequence
    resumed.load_state_dict(state)
    tail = _draw(resumed, 23)
    assert head + tail == reference


# ---------------------------------------------------------------------------------------------
# Input sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('make', [_ordered, _random])
def test_input_sizes(make):
    sampler = make(0, input_scale=(0.43, 1.0))
    sizes = [p.input_size for p in _draw(sampler, 2000, height=200)]
    assert all(type(s) is int and 86 <= s <= 200 for s in sizes)
    assert min(sizes) <= 89 and max(sizes) >= 197
    assert len(set(sizes)) > 80


def test_fixed_input_scale_and_none():
    assert {p.input_size for p in _draw(_ordered(0, input_scale=(0.5, 0.5)), 20, height=200)} == {100}
    for make in (_ordered, _random):
        sampler = make(0, input_scale=None)
        assert all(p.input_size is None for p in _draw(sampler, 20, height=200))
        assert sampler.sample().input_size is None
        with pytest.raises(ValueError):
            make(0, input_scale=(0.5, 1.0)).sample()  # needs the batch height


# ---------------------------------------------------------------------------------------------
# RandomSubnetSampler
# ---------------------------------------------------------------------------------------------

def test_random_sampler_keep_rule():
    depths = R50
    non_droppable = {(2, 3), (1, 3)}
    stages = fake_stages(depths, non_droppable)
    p_min = 0.5
    sampler = RandomSubnetSampler(stages, min_keep_prob=p_min, seed=0)
    n = 4000
    counts = [[0] * d for d in depths]
    masks_seen = set()
    for _ in range(n):
        plan = sampler.sample()
        masks_seen.add(plan.blocks)
        for s, kept in enumerate(plan.blocks):
            for i in kept:
                counts[s][i] += 1
    total = sum(depths)
    l = 0
    for s, d in enumerate(depths):
        for i in range(d):
            freq = counts[s][i] / n
            if i == 0 or (s, i) in non_droppable:
                assert freq == 1.0, (s, i)
            else:
                expected = 1.0 - l / (total - 1) * (1.0 - p_min)
                assert abs(freq - expected) < 0.04, (s, i, freq, expected)
            l += 1
    # deepest block (index L-1) is kept with probability min_keep_prob
    assert abs(counts[-1][-1] / n - p_min) < 0.04
    # random plans are arbitrary masks, not only prefixes
    assert any(any(kept != tuple(range(len(kept))) for kept in blocks) for blocks in masks_seen)


def test_random_sampler_min_keep_prob_one_keeps_everything():
    sampler = RandomSubnetSampler(fake_stages(R50), min_keep_prob=1.0, seed=0)
    full = SubnetPlan.prefix(R50)
    assert all(p == full for p in _draw(sampler, 50))


@pytest.mark.parametrize('space', [{'min_keeps': [1, 2, 3, 1]}, {'min_keep': [1, 1, 1, 1], 'max_drop': [0, 0, 0, 0]}])
def test_mapping_space_needs_exactly_one_known_key(space):
    stages = [timm_st.Stage(nn.Sequential(*[nn.Identity() for _ in range(d)]), (True,) * d) for d in (3, 4, 6, 3)]
    with pytest.raises(ValueError, match='exactly one key, max_drop or min_keep'):
        timm_st.resolve_sample_space(space, stages)


@pytest.mark.parametrize('size', [100.7, '64', True, 0])
def test_plan_input_size_must_be_positive_int(size):
    with pytest.raises(ValueError, match='input_size'):
        timm_st.SubnetPlan(((0,),), input_size=size)
