"""Distributed (DDP, gloo, 2 CPU processes) stimulative training.

Every rank's gradients equal those of one process running the same task on the joined batch
(sub-networks leaving blocks unused in the last, DDP-wrapped pass; resized inputs; kl_direction;
gradient accumulation; common training), and both ranks, trained on different shards, end with the
same weights, those of the single process; exactly one gradient all-reduce per optimizer step and
none on `no_sync` micro-steps; the built-in samplers draw the same plans on every rank whatever
the ranks' global seeds. Controls run without DDP (ranks train independently) and with the reduction
on the first sub-network instead of the last, and the same checks fail.

The two ranks run once per module, as subprocesses of this file (`python test_ddp.py --worker
RANK PORT OUTDIR`), all scenarios in one process group, each scenario's results saved as soon as
it finishes; a hard timeout kills them, so a hang fails the tests instead of blocking CI. The
single-process references are computed in the pytest process.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import timm
import torch

from conftest import FixedSampler, assert_nontrivial_grads
from timm_st import StimulativeTask, SubnetPlan

WORLD = 2
BATCH = 8  # joined batch; each rank gets BATCH // WORLD samples
TIMEOUT_S = 180  # whole two-process run (normally ~15 s); a hang fails the tests after this
COLLECTIVE_TIMEOUT_S = 45


# --- shared between the workers and the pytest process -----------------------------------------

def make_model():
    torch.manual_seed(0)
    return timm.create_model(
        'vit_tiny_patch16_224', img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2, num_classes=5,
        drop_rate=0., proj_drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
        dynamic_img_size=True, dynamic_img_pad=True,  # sub-networks may run on resized inputs
    ).train()


def micro_batch(step, micro, rank=0, world=1):
    """Micro-batch `micro` of step `step`: the rank's shard of a fixed joined batch."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(BATCH, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (BATCH,), generator=g)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def plan_key(plan):
    return (plan.blocks, plan.input_size)


P = SubnetPlan.prefix
# name -> (config, fixed plans (None: the built-in sampler), micro-steps per optimizer step)
SCENARIOS = {
    # last sub-network drops blocks 2, 3 (block 3 used by the main pass only), then blocks 1..3
    'unused_in_last_subnet': ({'num_subnets': 2}, [P((3,)), P((2,)), P((4,)), P((1,))], [1, 1]),
    'resize': ({'num_subnets': 2}, [P((4,), input_size=12), P((2,), input_size=8),
                                    SubnetPlan.from_masks([[1, 0, 1, 1]], input_size=10), P((3,))], [1, 1]),
    'kl_direction': ({'num_subnets': 2, 'loss': 'kl_direction', 'amplitude': 2.0, 'temperature': 2.0},
                     [SubnetPlan.from_masks([[1, 0, 1, 1]]), P((2,), input_size=12)], [1, 1]),
    'one_allreduce': ({'num_subnets': 3, 'coef': 0.5},
                      [P((2,)), P((4,), input_size=12), P((3,)), P((1,)), P((4,)), P((2,), input_size=8)],
                      [1, 2, 1]),
    'common': ({'num_subnets': 0}, None, [1, 2, 1]),
    'builtin_ordered': ({'num_subnets': 2, 'input_scale': [0.5, 1.0], 'seed': 7}, None, [1, 1, 1]),
    'builtin_random': ({'num_subnets': 2, 'sampler': 'random', 'min_keep_prob': 0.3, 'seed': 3}, None, [1, 1, 1]),
}
HOOKED = ('one_allreduce', 'common')  # scenarios counting all-reduces with a comm hook


def _no_ddp(task):
    """Wrong variant: no DDP wrapper, each rank trains on its own shard."""


def _first_subnet_synced(task):
    """Wrong variant: DDP wraps the model, but the reduction runs with the first sub-network of each step
    instead of the last, so the later sub-networks' gradients stay local."""
    task.prepare_distributed(bucket_cap_mb=1000)
    run = task._run
    subnets = [0]

    def first_synced(x, subnet, sync):
        subnets[0] = subnets[0] + 1 if subnet else 0
        return run(x, subnet=subnet, sync=sync if not subnet else subnets[0] == 1)
    task._run = first_synced


MUTATIONS = {'no_ddp': _no_ddp, 'first_subnet_synced': _first_subnet_synced}
# controls: scenario@mutation, run with the scenarios; the checks of the scenario must fail on them
CONTROLS = ['unused_in_last_subnet@no_ddp', 'unused_in_last_subnet@first_subnet_synced', 'resize@no_ddp']
CASES = list(SCENARIOS) + CONTROLS


def make_task(name):
    config, plans, _ = SCENARIOS[name]
    sampler = FixedSampler(plans) if plans is not None else None
    task = StimulativeTask(make_model(), config, sampler=sampler, verbose=False)
    drawn = []
    if plans is None and task.sampler is not None:  # record what the built-in sampler draws
        sample = task.sampler.sample

        def recording_sample(input_height=None):
            plan = sample(input_height=input_height)
            drawn.append(plan_key(plan))
            return plan

        task.sampler.sample = recording_sample
    return task, drawn


def run_steps(task, name, rank=0, world=1, counter=None):
    """timm's loop: per optimizer step, micro-steps under `no_sync` but the last, `loss /= accum`,
    one backward each; gradients recorded, then an SGD update and `zero_grad(set_to_none)`.
    Returns the gradients of every step, the all-reduce counts per micro-step and the final weights."""
    model = task.model
    grads, counts = [], []
    for step, accum in enumerate(SCENARIOS[name][2]):
        step_counts = []
        for micro in range(accum):
            x, y = micro_batch(step, micro, rank, world)
            before = counter[0] if counter is not None else 0
            with task.no_sync() if micro < accum - 1 else _null():
                loss = task(x, y)['loss']
                if accum > 1:
                    loss /= accum
                loss.backward()
            step_counts.append(counter[0] - before if counter is not None else None)
        counts.append(step_counts)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.5)
                    p.grad = None
    return grads, counts, {n: p.detach().clone() for n, p in model.named_parameters()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- workers -------------------------------------------------------------------------------------

def _run_scenario(case, rank):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    name, _, mutation = case.partition('@')
    task, drawn = make_task(name)
    torch.manual_seed(1234 + rank)  # different global RNG per rank, as timm's per-rank seeding does
    seed_probe = torch.rand(()).item()
    if mutation:
        MUTATIONS[mutation](task)
    else:
        task.prepare_distributed(bucket_cap_mb=1000)  # one bucket: the whole model
    counter = None
    if name in HOOKED:
        counter = [0]

        def counting_hook(state, bucket):
            counter[0] += 1
            return allreduce_hook(None, bucket)

        task.trainable_module.register_comm_hook(None, counting_hook)
    grads, counts, weights = run_steps(task, name, rank, WORLD, counter)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, drawn)
    return {'grads': grads, 'counts': counts, 'weights': weights, 'drawn': drawn, 'drawn_all_ranks': gathered,
            'seed_probe': seed_probe}


def _worker(rank, port, outdir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    path = os.path.join(outdir, f'rank{rank}.pt')
    for name in CASES:
        with open(os.path.join(outdir, f'rank{rank}.progress'), 'w') as f:
            f.write(name)
        try:
            results[name] = _run_scenario(name, rank)
        except Exception:
            results[name] = {'error': traceback.format_exc()}
        torch.save(results, path + '.tmp')
        os.replace(path + '.tmp', path)
    with open(os.path.join(outdir, f'rank{rank}.progress'), 'w') as f:
        f.write('done')
    dist.destroy_process_group()


# --- pytest side ---------------------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_results():
    """Runs both ranks once (all scenarios and controls); returns {case: [rank0 result, rank1 result]}."""
    with tempfile.TemporaryDirectory() as outdir:
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        port = _free_port()
        logs = [open(os.path.join(outdir, f'rank{r}.log'), 'w+') for r in range(WORLD)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), '--worker', str(r), str(port), outdir],
                                  stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(WORLD)]
        deadline = time.monotonic() + TIMEOUT_S
        timed_out = False
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

        def read(name):
            path = os.path.join(outdir, name)
            if not os.path.exists(path):
                return '<missing>'
            with open(path) as f:
                return f.read()

        for f in logs:
            f.close()
        diag = '\n'.join(f'--- rank {r} (at scenario {read(f"rank{r}.progress")!r}) ---\n{read(f"rank{r}.log")[-4000:]}'
                         for r in range(WORLD))
        per_rank = []
        for r in range(WORLD):
            path = os.path.join(outdir, f'rank{r}.pt')
            per_rank.append(torch.load(path, weights_only=True) if os.path.exists(path) else {})
    if timed_out:
        pytest.fail(f'DDP workers did not finish within {TIMEOUT_S} s (hang?)\n{diag}')
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f'DDP workers failed: return codes {[p.returncode for p in procs]}\n{diag}')
    return {name: [per_rank[r].get(name, {'error': 'no result'}) for r in range(WORLD)] for name in CASES}


def _results(ddp_results, name):
    res = ddp_results[name]
    errors = [f'rank {r}:\n{x["error"]}' for r, x in enumerate(res) if 'error' in x]
    if errors:
        pytest.fail(f'scenario {name!r} failed in the workers:\n' + '\n'.join(errors))
    return res


_REFERENCES = {}


def _reference(name):
    """The single-process run on the joined batches: gradients per step, plans drawn, final weights."""
    if name not in _REFERENCES:
        task, drawn = make_task(name)
        grads, _, weights = run_steps(task, name)
        _REFERENCES[name] = grads, drawn, weights
    return _REFERENCES[name]


def _assert_weights_equal_reference(res, ref_weights):
    """Both ranks end with the same weights (bit for bit), those of the single-process run."""
    for n, ref in ref_weights.items():
        assert torch.equal(res[0]['weights'][n], res[1]['weights'][n]), f'ranks diverged: {n}'
        torch.testing.assert_close(res[0]['weights'][n], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f'{n}: {m}')


def _assert_grads_equal_reference(res, ref_grads):
    """Every step's gradients: the same on both ranks (bit for bit, also of parameters a rank's last, DDP-wrapped
    pass left unused) and those of the single-process run on the joined batch."""
    for step, (a, b) in enumerate(zip(res[0]['grads'], res[1]['grads'])):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), f'step {step} {n}: ranks differ'
    for r, rank_res in enumerate(res):
        assert len(rank_res['grads']) == len(ref_grads)
        for step, (got, ref) in enumerate(zip(rank_res['grads'], ref_grads)):
            assert got.keys() == ref.keys(), f'rank {r} step {step}: parameters with gradients differ'
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f'rank {r} step {step} {n}: {m}')


@pytest.mark.parametrize('name', ['unused_in_last_subnet', 'resize', 'kl_direction'])
def test_gradients_equal_single_process(ddp_results, name):
    res = _results(ddp_results, name)
    ref_grads, _, ref_weights = _reference(name)
    for step_grads in ref_grads:
        assert_nontrivial_grads(step_grads)
    _assert_grads_equal_reference(res, ref_grads)
    _assert_weights_equal_reference(res, ref_weights)


@pytest.mark.parametrize('name', ['one_allreduce', 'common'])
def test_one_allreduce_per_step_and_accumulation(ddp_results, name):
    """Counts per micro-step: one all-reduce on synced micro-steps (3 sub-networks), none under
    `task.no_sync()`; gradients after accumulation equal the single-process ones on the joined batches."""
    res = _results(ddp_results, name)
    expected = [[0] * (accum - 1) + [1] for accum in SCENARIOS[name][2]]
    for r in range(WORLD):
        assert res[r]['counts'] == expected, f'rank {r}'
    ref_grads, _, ref_weights = _reference(name)
    _assert_grads_equal_reference(res, ref_grads)
    _assert_weights_equal_reference(res, ref_weights)


@pytest.mark.parametrize('name', ['builtin_ordered', 'builtin_random'])
def test_builtin_sampler_same_plans_on_all_ranks(ddp_results, name):
    res = _results(ddp_results, name)
    assert res[0]['seed_probe'] != res[1]['seed_probe'], 'ranks were meant to have different global seeds'
    drawn = res[0]['drawn_all_ranks']
    num_draws = SCENARIOS[name][0]['num_subnets'] * sum(SCENARIOS[name][2])
    assert len(drawn[0]) == num_draws
    assert all(d == drawn[0] for d in drawn), drawn
    assert len(set(drawn[0])) > 1, 'the sampler drew a single plan: the test shows nothing'
    ref_grads, ref_drawn, ref_weights = _reference(name)
    assert ref_drawn == drawn[0], 'the single-process reference drew other plans'
    _assert_grads_equal_reference(res, ref_grads)
    _assert_weights_equal_reference(res, ref_weights)


@pytest.mark.parametrize('case', CONTROLS)
def test_checks_fail_without_ddp_averaging(ddp_results, case):
    """Controls: run without DDP (ranks train on their own shards) or with the reduction before the last
    sub-network, the gradient and final-weight checks above fail."""
    res = _results(ddp_results, case)
    ref_grads, _, ref_weights = _reference(case.partition('@')[0])
    with pytest.raises(AssertionError):
        _assert_grads_equal_reference(res, ref_grads)
    with pytest.raises(AssertionError):
        _assert_weights_equal_reference(res, ref_weights)


@pytest.mark.parametrize('kwargs', [{'find_unused_parameters': False}, {'static_graph': True}])
def test_prepare_distributed_rejects_static_ddp_with_subnets(kwargs):
    """Checked before DDP is constructed, so no process group is needed."""
    task = StimulativeTask(make_model(), {'num_subnets': 2}, verbose=False)
    with pytest.raises(ValueError, match='find_unused_parameters=True'):
        task.prepare_distributed(**kwargs)
    assert task.trainable_module is task.model


if __name__ == '__main__' and len(sys.argv) == 5 and sys.argv[1] == '--worker':
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
