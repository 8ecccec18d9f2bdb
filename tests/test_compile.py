"""Compiled steps: the full network as one graph and every block compiled in place; the number of graphs
bounded per block kind and calling context (counted for every context, with the real compiler too), every
sub-network block call running compiled code, gradients equal to the eager step's; evaluation and
BatchNorm re-estimation after compile() add no graphs; `timm-st train --torchcompile` runs compiled code."""
import copy

import pytest
import timm
import torch
from torch._dynamo.utils import counters

from timm_st import StimulativeTask, recalibrate_bn
from timm_st.analysis.evaluation import evaluate_plans, space_plans
from timm_st.method.backends import BLOCK_CONTEXTS, SHAPE_BUCKETS, block_graph_bound, block_kinds

from conftest import (PLANS, FixedSampler, assert_grads_close, assert_nontrivial_grads, batch, clone, grads,
                      half_batch_reference)

ST_PP = {'num_subnets': 6, 'input_scale': [0.43, 1.0], 'loss': 'kl_direction'}


class CountingBackend:
    """A dynamo backend that runs the captured graph as it is (so results are bit-identical to eager)
    and counts the graphs it compiled and the times compiled code ran."""

    def __init__(self, compile_graph=None):
        self.graphs = 0
        self.calls = 0
        self.compile_graph = compile_graph

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        fn = gm.forward if self.compile_graph is None else self.compile_graph(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return fn(*args)
        return run


class PlanLog:
    """Records the plans a task's sampler draws."""

    def __init__(self, sampler):
        self.plans = []
        draw = sampler.sample

        def sample(**kwargs):
            plan = draw(**kwargs)
            self.plans.append(plan)
            return plan
        sampler.sample = sample

    def block_calls(self, since=0):
        return sum(sum(p.depths) for p in self.plans[since:])


def tiny_cifar_resnet(widths=(8, 8, 16), **kwargs):
    torch.manual_seed(0)
    return timm.create_model('resnet20_cifar', widths=widths, num_classes=7, **kwargs).train()


def test_compilations_bounded_by_block_kinds_over_many_st_pp_steps():
    """40 ST++ steps (240 sub-networks of many plans and input sizes): one whole-model graph for the
    full network, and block graphs within block kinds x 1 context (sub-network pass) x 1 shape bucket
    (no dimension of size 1 at these sizes); every full pass and every block of every sub-network ran
    compiled code, and the gradients are bit-identical to the eager step's (a pass-through backend)."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_cifar_resnet()
    eager_model = clone(model)
    backend = CountingBackend()
    task = StimulativeTask(model, ST_PP, verbose=False)
    assert task.compile(backend=backend) is task.get_eval_model()
    eager = StimulativeTask(eager_model, ST_PP, verbose=False)
    log = PlanLog(task.sampler)
    steps = 40
    for step in range(steps):
        x, y = batch(n=2, size=32, seed=step)
        task(x, y)['loss'].backward()
        eager(x, y)['loss'].backward()

    kinds = block_kinds(task.stages)
    assert kinds == 4  # 8 blocks alike (8 channels, stages 1-2), 2 projecting first blocks, 2 blocks of 16
    assert len({p.input_size for p in log.plans}) > 2 * kinds and len(set(log.plans)) > 2 * kinds
    assert backend.graphs == 1 + kinds
    assert counters['stats']['unique_graphs'] == backend.graphs
    assert backend.calls == steps + log.block_calls()
    assert_nontrivial_grads(grads(eager_model))
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert model.state_dict().keys() == eager_model.state_dict().keys()


def _loader(n_batches=2, n=4, size=16, seed=0):
    return [batch(n=n, size=size, seed=seed + i) for i in range(n_batches)]


def test_graphs_per_calling_context_and_none_from_evaluation():
    """Each of the four calling contexts of the bound (sub-network pass; the model called directly in train
    mode with and without gradients, and in eval mode) compiles at most one graph per block kind at any
    number of sizes, and each adds its own; sub-network evaluation (tree and one by one, running and
    re-estimated statistics), `recalibrate_bn` and `before_validate` afterwards compile nothing and run no
    compiled code (they would recompile on the swapped statistics and the per-batch momenta)."""
    torch._dynamo.reset()
    model = tiny_cifar_resnet()
    backend = CountingBackend()
    task = StimulativeTask(model, {**ST_PP, 'recalibrate_bn': 8}, verbose=False)
    task.compile(backend=backend)
    kinds = block_kinds(task.stages)
    sizes = (14, 18, 23, 32)

    def new_graphs(run):
        before = backend.graphs
        run()
        return backend.graphs - before

    def subnet_passes():
        model.train()
        for step in range(6):
            task(*batch(n=2, size=32, seed=step))['loss'].backward()

    def direct(train, grad):
        def run():
            model.train(train)
            for size in sizes:
                with torch.set_grad_enabled(grad):
                    out = model(batch(n=2, size=size, seed=size)[0])
                if grad:
                    out.sum().backward()
        return run

    per_context = [new_graphs(subnet_passes) - 1,  # one whole-model graph for the full passes
                   new_graphs(direct(True, True)), new_graphs(direct(True, False)), new_graphs(direct(False, False))]
    assert len(per_context) == BLOCK_CONTEXTS
    assert per_context == [kinds] * BLOCK_CONTEXTS, per_context
    assert new_graphs(subnet_passes) + new_graphs(direct(True, True)) + new_graphs(direct(False, False)) == 0
    assert backend.graphs - 1 <= block_graph_bound(task.stages) == kinds * BLOCK_CONTEXTS * SHAPE_BUCKETS

    graphs, calls = backend.graphs, backend.calls
    plans = space_plans(task.stages)
    loader = _loader()
    for method in ('tree', 'each'):
        for bn in ('running', 'recalibrate'):
            evaluate_plans(model, plans, loader, 'cpu', bn=bn, calib_loader=_loader(seed=5), calib_images=8,
                           method=method)
    recalibrate_bn(model, _loader(seed=9), 8)
    assert task.before_validate(_loader(seed=11)) == 8
    assert (backend.graphs, backend.calls) == (graphs, calls), 'evaluation or re-estimation ran compiled blocks'


def test_shape_bucket_for_size_one_dimensions():
    """Sizes down to 1x1 feature maps (resnet18 at 13-32 px): at most SHAPE_BUCKETS graphs per kind, more than
    one for some kind, and every block of every sub-network ran compiled code (no eager fallback)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=7).train()
    backend = CountingBackend()
    task = StimulativeTask(model, ST_PP, verbose=False)
    task.compile(backend=backend)
    log = PlanLog(task.sampler)
    ones = []
    model.layer4.register_forward_pre_hook(lambda m, a: ones.append(a[0].shape[-1] == 1))  # eager container
    steps = 6
    for step in range(steps):
        task(*batch(n=2, size=32, seed=step))['loss'].backward()
    kinds = block_kinds(task.stages)
    assert any(ones) and not all(ones)
    assert 1 + kinds < backend.graphs <= 1 + kinds * SHAPE_BUCKETS
    assert backend.calls == steps + log.block_calls()


def test_every_block_its_own_kind_stays_compiled():
    """drop_path > 0 makes every block its own kind (27 in resnet56_cifar, above dynamo's default limit of 8
    graphs per function): compile() raises the limits, so every block of every sub-network still runs
    compiled code."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('resnet56_cifar', widths=(4, 4, 4), num_classes=7, drop_path_rate=0.1).train()
    backend = CountingBackend()
    task = StimulativeTask(model, {'num_subnets': 2, 'sampler': 'random', 'min_keep_prob': 0.9}, verbose=False)
    task.compile(backend=backend)
    assert block_kinds(task.stages) == 27
    log = PlanLog(task.sampler)
    for step in range(3):
        task(*batch(n=2, size=8, seed=step))['loss'].backward()
    assert backend.graphs > 8
    assert backend.calls == 3 + log.block_calls()


@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks=pytest.mark.slow)])
def test_compiled_step_matches_eager_without_recompiling(resnet, backend):
    torch._dynamo.reset()
    counters.clear()
    config = {'num_subnets': 2}
    ref_model = clone(resnet)
    task = StimulativeTask(resnet, config, sampler=FixedSampler(PLANS), verbose=False)
    task.compile(backend=backend)
    eager = StimulativeTask(ref_model, config, sampler=FixedSampler(PLANS), verbose=False)
    for step in range(4):
        x, y = batch(seed=step)
        task(x, y)['loss'].backward()
        eager(x, y)['loss'].backward()
        if step == 1:  # both plan cycles (PLANS has 3, two per step) have been seen
            graphs = counters['stats']['unique_graphs']
    assert counters['stats']['unique_graphs'] == graphs, 'a repeated plan or size recompiled'
    assert_nontrivial_grads(grads(ref_model))
    assert_grads_close(grads(resnet), grads(ref_model), rel=1e-5)
    assert task.get_eval_model() is task.eval_model


def test_inductor_graphs_bounded_over_100_random_st_pp_steps():
    """The real compiler (inductor, CPU): 100 ST++ steps of random plans (random sampler) and sizes on a grid
    (input_size_multiple), on a tiny two-stage model of two block kinds. After a warm-up no step compiles a
    new graph; every full pass and every sub-network block call ran inductor's code; the gradients of a last
    step match the eager step's, and are non-trivial."""
    from torch._inductor.compile_fx import compile_fx
    torch._dynamo.reset()
    model = tiny_cifar_resnet(widths=(8, 8), depths=(3, 3))
    config = {'num_subnets': 2, 'input_scale': [0.75, 1.0], 'input_size_multiple': 4, 'sampler': 'random',
              'min_keep_prob': 0.5, 'loss': 'kl_direction'}
    backend = CountingBackend(compile_graph=compile_fx)
    task = StimulativeTask(model, config, verbose=False)
    task.compile(backend=backend)
    log = PlanLog(task.sampler)
    assert block_kinds(task.stages) == 2
    warmup, steps = 12, 100
    for step in range(steps):
        if step == warmup:
            graphs = backend.graphs
        task(*batch(n=2, size=16, seed=step))['loss'].backward()
    assert backend.graphs == graphs, 'a step after the warm-up compiled a new graph'
    assert {p.input_size for p in log.plans} == {12, 16} and len(set(log.plans)) > 10
    assert backend.calls == steps + log.block_calls()

    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)  # an eager copy (compiled code is not copied)
    eager = StimulativeTask(reference, config, verbose=False)
    eager.sampler.load_state_dict(task.sampler.state_dict())
    x, y = batch(n=2, size=16, seed=steps)
    task(x, y)['loss'].backward()
    eager(x, y)['loss'].backward()
    assert backend.graphs == graphs
    assert_nontrivial_grads(grads(reference))
    assert_grads_close(grads(model), grads(reference), rel=1e-4)


def test_common_training_compiles_whole_model_only(resnet):
    torch._dynamo.reset()
    ref_model = clone(resnet)
    backend = CountingBackend()
    task = StimulativeTask(resnet, {'num_subnets': 0}, verbose=False)
    assert task.compile(backend=backend) is task.get_eval_model()
    assert all(b._compiled_call_impl is None for b in resnet.layer1)
    eager = StimulativeTask(ref_model, {'num_subnets': 0}, verbose=False)
    x, y = batch()
    task(x, y)['loss'].backward()
    eager(x, y)['loss'].backward()
    assert backend.graphs == 1 and backend.calls == 1
    for (name, p), q in zip(resnet.named_parameters(), ref_model.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert resnet.state_dict().keys() == ref_model.state_dict().keys()


@pytest.mark.parametrize('ema_first', [True, False], ids=['ema-then-compile', 'compile-then-ema'])
def test_ema_with_compiled_model(ema_first):
    """Both orders give an EMA that follows its own weights (a copy made after compile() is eager, not
    bound to the live blocks), and compile_ema() validates like the eager EMA."""
    torch._dynamo.reset()
    model = tiny_cifar_resnet()
    task = StimulativeTask(model, {'num_subnets': 1}, verbose=False)
    if ema_first:
        task.setup_ema(decay=0.5)
        task.compile(backend='eager')
    else:
        task.compile(backend='eager')
        task.setup_ema(decay=0.5)
    ema = task.get_trainable_module(ema=True).module
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    task(*batch())['loss'].backward()
    opt.step()
    task.update_ema(step=5)
    task.compile_ema(backend='eager')
    x, _ = batch(seed=7)
    reference = copy.deepcopy(ema).eval()
    ema.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.get_eval_model(ema=True)(x), reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ema(x), reference(x), rtol=1e-5, atol=1e-5)


# --- size grid for ST++ inputs (input_size_multiple) --------------------------------------------

def _reference_ordered_draws(seed, max_drop, low, high, n):
    """The ordered sampler's draws written out: per plan, one drop count per stage, then the side."""
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n):
        drops = [int(torch.randint(0, m + 1, (1,), generator=g)) for m in max_drop]
        draws.append((drops, int(torch.randint(low, high + 1, (1,), generator=g))))
    return draws


@pytest.mark.parametrize('multiple', [1, 8, 7])
def test_size_grid_rounds_sides_and_keeps_the_draw_sequence(multiple):
    config = {'num_subnets': 6, 'input_scale': [0.43, 1.0], 'seed': 5}
    if multiple != 1:
        config['input_size_multiple'] = multiple
    task = StimulativeTask(tiny_cifar_resnet(), config, verbose=False)
    plans = [task.sampler.sample(input_height=200) for _ in range(300)]
    reference = _reference_ordered_draws(5, (2, 2, 2), 86, 200, 300)
    for plan, (drops, side) in zip(plans, reference):
        assert plan.depths == tuple(3 - d for d in drops)
        rounded = max(multiple, int(side / multiple + 0.5) * multiple)  # nearest multiple, halves up
        assert plan.input_size == rounded
    sides = {p.input_size for p in plans}
    if multiple == 8:
        assert sides == set(range(88, 201, 8))  # 15 shapes instead of up to 115


def test_size_grid_subnets_see_the_rounded_size():
    seen = []
    model = tiny_cifar_resnet()
    model.stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    task = StimulativeTask(model, {'num_subnets': 4, 'input_scale': [0.3, 1.0], 'input_size_multiple': 4},
                           verbose=False)
    task(*batch(n=2, size=30))['loss'].backward()
    assert seen[0] == 30 and len(seen) == 5 and all(s % 4 == 0 and 8 <= s <= 32 for s in seen[1:])


@pytest.mark.parametrize('value', [0, -8, 1.5, 8.0, True, '8', None, [8]])
def test_size_grid_rejects_bad_values(value):
    from timm_st import StimulativeConfig
    with pytest.raises(ValueError, match=r'^stimulative\.input_size_multiple: got .*; allowed: an integer >= 1'):
        StimulativeConfig.from_dict({'input_scale': [0.5, 1.0], 'input_size_multiple': value})


def test_size_grid_needs_input_scale():
    from timm_st import StimulativeConfig
    with pytest.raises(ValueError, match=r'^stimulative\.input_size_multiple: only used with input_scale: \[lo, hi\], '
                                         r'but input_scale is None; remove input_size_multiple or set input_scale'):
        StimulativeConfig.from_dict({'input_size_multiple': 8})
    assert StimulativeConfig.from_dict({'input_scale': [0.5, 1.0], 'input_size_multiple': 8}).input_size_multiple == 8
    assert StimulativeConfig.from_dict({}).input_size_multiple == 1


# --- DDP (gloo, 2 CPU processes) with compiled blocks -------------------------------------------

DDP_CONFIG = {'num_subnets': 3, 'input_scale': [0.5, 1.0], 'seed': 3}


def _ddp_data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 7, (8,), generator=g)


def _ddp_compiled_worker(rank, port, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    task = StimulativeTask(tiny_cifar_resnet(), DDP_CONFIG, verbose=False)
    task.compile(backend='aot_eager')
    task.prepare_distributed()
    steps = []
    for step in range(3):
        x, y = _ddp_data(step)
        task(x.chunk(2)[rank], y.chunk(2)[rank])['loss'].backward()
        steps.append({n: p.grad.clone() for n, p in task.model.named_parameters()})
        for p in task.model.parameters():
            p.grad = None
    torch.save(steps, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_compiled_gradients_equal_single_process_eager(tmp_path):
    """Two ranks, compiled blocks: each rank's gradients are the mean of the eager gradients of the two
    half-batches (the same plans on both ranks), so the main pass / last-sub-network DDP routing holds."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_compiled_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    task = StimulativeTask(tiny_cifar_resnet(), DDP_CONFIG, verbose=False)
    for step, reference in enumerate(half_batch_reference(task, _ddp_data, steps=3)):
        for got in ranks:
            assert_grads_close(got[step], reference, rel=1e-5)
