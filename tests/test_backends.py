"""How the step uses the compiler and cuDNN (`timm_st.method.backends`): compile modes (CUDA graphs for the
whole-model graph only), the teacher never aliasing a graph output, both of dynamo's recompile limits raised,
and cuDNN autotuning off inside sub-network passes while sides vary without a grid."""
import pytest
import timm
import torch
from torch._inductor import list_mode_options

from timm_st import StimulativeTask, SubnetPlan
from timm_st.method import backends
from timm_st.method.backends import block_compile_options, block_graph_bound, check_compile_mode

from conftest import FixedSampler, assert_grads_close, assert_nontrivial_grads, batch, clone, grads


def tiny_model():
    torch.manual_seed(0)
    return timm.create_model('resnet20_cifar', widths=(8, 8, 16), num_classes=7).train()


# --- compile modes ----------------------------------------------------------------------------------

def _options(mode, options):
    """The inductor options a `torch.compile(mode=..., options=...)` call applies."""
    return {**(list_mode_options(mode, True) if mode else {}), **(options or {})}


@pytest.mark.parametrize('mode', sorted(list_mode_options()))
def test_blocks_never_get_cuda_graphs(mode):
    block_mode, options = block_compile_options('inductor', mode, None)
    merged = _options(block_mode, options)
    assert not merged.get('triton.cudagraphs')
    if list_mode_options(mode).get('triton.cudagraphs'):  # the rest of the mode is kept
        assert {k: v for k, v in merged.items() if k != 'triton.cudagraphs'} == {
            k: v for k, v in list_mode_options(mode, True).items() if k != 'triton.cudagraphs'}
    else:
        assert (block_mode, options) == (mode, None)
    _, options = block_compile_options('inductor', None, {'triton.cudagraphs': True, 'max_autotune': True})
    assert options == {'triton.cudagraphs': False, 'max_autotune': True}
    assert block_compile_options('aot_eager', None, None) == (None, None)


@pytest.mark.parametrize('mode', ['reduce-overhead', 'max-autotune'])
def test_compile_gives_cuda_graphs_to_the_whole_model_only(mode, monkeypatch):
    """What compile() asks torch.compile for: the whole model with the mode, every block without CUDA graphs."""
    calls = []

    def record(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, 'compile', record)
    task = StimulativeTask(tiny_model(), {'num_subnets': 1}, verbose=False)
    task.compile(mode=mode)
    whole, blocks = calls[0], calls[1:]
    assert whole['mode'] == mode and whole['backend'] == 'inductor'
    assert len(blocks) == sum(stage.depth for stage in task.stages)
    for kwargs in blocks:
        options = _options(kwargs['mode'], kwargs['options'])
        assert kwargs['dynamic'] is True and options.get('triton.cudagraphs') is False


@pytest.mark.parametrize('backend, mode, message', [
    ('inductor', 'fast', r"^torchcompile_mode: got 'fast'; allowed: default, .*max-autotune.*reduce-overhead"),
    ('aot_eager', 'reduce-overhead', r"^torchcompile_mode: 'reduce-overhead' is an inductor mode but the backend "
                                     r"is 'aot_eager'; use --torchcompile inductor or leave the mode unset$"),
])
def test_check_compile_mode_refuses_before_any_work(backend, mode, message):
    with pytest.raises(ValueError, match=message):
        check_compile_mode(backend, mode)
    task = StimulativeTask(tiny_model(), {'num_subnets': 1}, verbose=False)
    with pytest.raises(ValueError, match=message):
        task.compile(backend=backend, mode=mode)
    assert all(b._compiled_call_impl is None for s in task.stages for b in s.container)


@pytest.mark.parametrize('mode', [None, *sorted(list_mode_options())])
def test_check_compile_mode_accepts_every_inductor_mode(mode):
    check_compile_mode('inductor', mode)
    check_compile_mode('aot_eager', None)


def test_teacher_is_not_the_main_pass_output():
    """A compiled main path whose output buffer is written again after the forward (as the next replay of a
    CUDA graph does) must not change the sub-network gradients: the teacher is a copy. fp32 and plain KL, where
    the teacher would otherwise be the output itself."""
    model = tiny_model()
    reference = clone(model)
    config = {'num_subnets': 2, 'loss': 'kl'}
    plans = [SubnetPlan.prefix((1, 2, 3), input_size=24), SubnetPlan.prefix((2, 1, 1))]
    task = StimulativeTask(model, config, sampler=FixedSampler(plans), verbose=False)
    outputs = []

    def reused_buffer_main(x):
        outputs.append(model(x))
        return outputs[-1]
    object.__setattr__(task._runner, 'main', reused_buffer_main)  # where compile() puts the compiled model
    eager = StimulativeTask(reference, config, sampler=FixedSampler(plans), verbose=False)
    x, y = batch(n=4, size=32)
    loss = task(x, y)['loss']
    outputs[-1].data.copy_(torch.randn_like(outputs[-1]))  # the next replay writes the graph's output buffer
    loss.backward()
    eager(x, y)['loss'].backward()
    assert_nontrivial_grads(grads(reference))
    assert_grads_close(grads(model), grads(reference), rel=1e-6)


# --- dynamo's limits --------------------------------------------------------------------------------

@pytest.fixture
def default_limits(monkeypatch):
    """dynamo's default limits for the test, restored afterwards (its config's own patching)."""
    monkeypatch.setattr(backends, '_requested_graphs', 0)
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield torch._dynamo.config


def test_compile_raises_both_recompile_limits_per_side(default_limits):
    config = default_limits
    task = StimulativeTask(tiny_model(), {'num_subnets': 3, 'input_scale': [0.5, 1.0], 'seed': 1}, verbose=False)
    task.compile(backend='eager')
    per_side = block_graph_bound(task.stages) * len(task.stages)
    assert per_side == 4 * backends.BLOCK_CONTEXTS * backends.SHAPE_BUCKETS * 3
    assert (config.recompile_limit, config.accumulated_recompile_limit) == (8 + per_side, 256 + per_side)
    task(*batch(n=2, size=32))['loss'].backward()
    sides = task._block_budget.sides
    assert 1 <= len(sides) <= 3
    needed = per_side * (1 + len(sides))
    assert (config.recompile_limit, config.accumulated_recompile_limit) == (8 + needed, 256 + needed)


# --- cuDNN autotuning --------------------------------------------------------------------------------

@pytest.mark.parametrize('config, autotune_in_subnets', [
    ({'input_scale': [0.5, 1.0]}, False),  # ~sides vary, no grid: off
    ({'input_scale': [0.5, 1.0], 'input_size_multiple': 4}, True),  # a grid: the caller's setting
    ({}, True),  # sub-networks see the batch's own size
], ids=['varying-sides', 'size-grid', 'batch-size'])
def test_cudnn_autotuning_inside_subnet_passes(config, autotune_in_subnets, monkeypatch):
    """The flag as the convolutions see it, in the forward and the backward of the full pass and of every
    sub-network pass, with autotuning on for training (as timm's train.py and timm-st train set it)."""
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', True)
    model = tiny_model()
    forward, backward = [], []

    def record(module, args, output):
        forward.append(torch.backends.cudnn.benchmark)
        output.register_hook(lambda g: backward.append(torch.backends.cudnn.benchmark))
    model.stem.register_forward_hook(record)
    task = StimulativeTask(model, {'num_subnets': 2, **config}, verbose=False)
    task(*batch(n=2, size=32))['loss'].backward()
    assert forward == [True] + [autotune_in_subnets] * 2
    assert backward == [True] + [autotune_in_subnets] * 2
    assert torch.backends.cudnn.benchmark is True
