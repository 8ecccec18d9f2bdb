"""GPU checks (skipped without CUDA; `benchmarks/gpu_check.py` runs them and collects their figures).

- gradients of AMP (fp16 with a loss scaler, bf16), channels-last and compiled steps against an fp32 eager
  step, on a model whose every parameter gets a non-zero reference gradient (at least 95% of the elements);
- the DDP equality test on two GPUs over NCCL (skipped below two GPUs);
- no host-device synchronisation in an ST++ step or per evaluated batch (`torch.cuda.set_sync_debug_mode`);
- the inductor graph count over many ST++ sizes (graphs per sub-network side, every block call compiled);
- every compile mode, CUDA graphs included, gives the eager gradients;
- the prefetcher race of timm <= 1.0.28 (a prefetcher written here the same way) and its guard;
- one-by-one calibration images are streamed, not all held on the device.

Figures go to the JSON-lines file named by `TIMM_ST_GPU_FIGURES` when it is set.
"""
import contextlib
import copy
import json
import os
import socket
import time

import pytest
import timm
import torch

from timm_st import StimulativeTask, subnet_stages
from timm_st.analysis.evaluation import evaluate_plans, space_plans
from timm_st.method.backends import block_graph_bound, block_kinds
from timm_st.prefetch import consumer_stream_batches

from conftest import assert_grads_close, assert_nontrivial_grads, half_batch_reference, randomize_bn_affine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

ST_PP = {'num_subnets': 3, 'input_scale': [0.43, 1.0], 'loss': 'kl_direction'}


def record_figure(name, **values):
    """Append `{'figure': name, ...values}` to the file named by TIMM_ST_GPU_FIGURES (gpu_check's JSON)."""
    path = os.environ.get('TIMM_ST_GPU_FIGURES')
    if path:
        with open(path, 'a') as f:
            f.write(json.dumps({'figure': name, **values}) + '\n')


def signal_resnet18():
    """resnet18 with every residual branch active (`zero_init_last=False`) and randomised BatchNorm affine
    parameters, so every parameter gets a non-zero gradient (at 64 px no stage runs on 1x1 maps)."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10, zero_init_last=False)
    return randomize_bn_affine(model).cuda().train()


def signal_cifar_resnet():
    """A small CIFAR ResNet (the package's, no zero-init) with randomised BatchNorm affine parameters: cheap to
    compile (five block kinds), every parameter with a non-zero gradient at 32 px."""
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', widths=(16, 32, 64), num_classes=10)
    return randomize_bn_affine(model).cuda().train()


def gpu_batch(n=16, size=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).cuda(), torch.randint(0, classes, (n,), generator=g).cuda()


def _gpu_step(model, x, y, config, amp_dtype=None, scaler=None, compile_kwargs=None):
    task = StimulativeTask(model, config, verbose=False)
    if compile_kwargs is not None:
        task.compile(**compile_kwargs)
    with torch.autocast('cuda', dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
        loss = task(x, y)['loss']
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        return {n: p.grad / scale for n, p in model.named_parameters()}
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def fp32_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # a true fp32 reference
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    torch._dynamo.reset()


@pytest.mark.parametrize('variant', ['fp16-scaler', 'bf16', 'channels-last', 'compile', 'bf16-channels-last-compile'])
def test_gpu_gradients_match_fp32_eager(variant, fp32_reference):
    """resnet18 at 64 px eagerly; the compiled variants on the small CIFAR ResNet at 32 px with sub-networks at
    the batch's side (inductor compiles the blocks once per side: one side keeps the test short)."""
    compiled = 'compile' in variant
    base = signal_cifar_resnet() if compiled else signal_resnet18()
    x, y = gpu_batch(size=32 if compiled else 64)
    config = {'num_subnets': 3, 'loss': 'kl_direction'} if compiled else ST_PP
    reference = _gpu_step(copy.deepcopy(base), x, y, config)
    assert_nontrivial_grads(reference)
    model = copy.deepcopy(base)
    amp = {'fp16-scaler': torch.float16, 'bf16': torch.bfloat16, 'bf16-channels-last-compile': torch.bfloat16}
    if 'channels-last' in variant:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler('cuda', init_scale=1024.0) if variant == 'fp16-scaler' else None
    got = _gpu_step(model, x, y, config, amp_dtype=amp.get(variant), scaler=scaler,
                    compile_kwargs={} if compiled else None)
    rel = {'fp16-scaler': 2e-2, 'bf16': 5e-2, 'bf16-channels-last-compile': 5e-2}.get(variant, 1e-4)
    assert_grads_close(got, reference, rel=rel)


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compile_modes_give_eager_gradients(mode, fp32_reference):
    """CUDA graphs for the whole-model graph (reduce-overhead), none for the blocks: three steps (the graphs are
    recorded, then replayed) give the eager steps' gradients; the teacher is never a replayed buffer. (The
    max-autotune modes differ only in autotuning, minutes per graph; their options are checked on CPU.)"""
    base = signal_cifar_resnet()
    config = {'num_subnets': 3, 'loss': 'kl'}  # plain KL: the teacher would be the graph's output itself
    model, reference = copy.deepcopy(base), copy.deepcopy(base)
    task = StimulativeTask(model, config, verbose=False)
    task.compile(mode=mode)
    eager = StimulativeTask(reference, config, verbose=False)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        x, y = gpu_batch(size=32, seed=step)
        task(x, y)['loss'].backward()
        eager(x, y)['loss'].backward()
        got = {n: p.grad for n, p in model.named_parameters()}
        ref = {n: p.grad for n, p in reference.named_parameters()}
        assert_nontrivial_grads(ref)
        assert_grads_close(got, ref, rel=1e-4)


# --- DDP over NCCL ----------------------------------------------------------------------------------

DDP_CONFIG = {'num_subnets': 3, 'input_scale': [0.5, 1.0], 'seed': 3}


def _ddp_data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)


def _nccl_worker(rank, port, out):
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    task = StimulativeTask(signal_resnet18(), DDP_CONFIG, verbose=False)
    task.prepare_distributed(device_ids=[rank])
    steps = []
    for step in range(3):
        x, y = _ddp_data(step)
        task(x.chunk(2)[rank].cuda(), y.chunk(2)[rank].cuda())['loss'].backward()
        steps.append({n: p.grad.cpu() for n, p in task.model.named_parameters()})
        for p in task.model.parameters():
            p.grad = None
    torch.save(steps, f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_ddp_nccl_gradients_equal_single_process(tmp_path):
    """Two GPUs, NCCL: each rank's gradients are the mean of the single-process gradients of the two half-batches
    (the same plans on both ranks)."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    task = StimulativeTask(signal_resnet18(), DDP_CONFIG, verbose=False)
    for step, reference in enumerate(half_batch_reference(task, _ddp_data, steps=3, device='cuda')):
        assert_nontrivial_grads(reference)
        for got in ranks:
            assert_grads_close(got[step], reference, rel=1e-4)


# --- no host-device synchronisation ---------------------------------------------------------------

def test_st_pp_steps_never_synchronise():
    """ST++ steps (bf16 autocast, channels-last: forward, backward with the sub-network passes, optimizer step)
    under `set_sync_debug_mode('error')`: any synchronising CUDA call raises."""
    model = signal_resnet18().to(memory_format=torch.channels_last)
    task = StimulativeTask(model, {**ST_PP, 'num_subnets': 6}, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [gpu_batch(seed=s) for s in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for x, y in batches:
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = task(x.contiguous(memory_format=torch.channels_last), y)['loss']
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(task.subnet_loss)
    record_figure('sync_debug_st_pp_steps', steps=len(batches), result='no synchronising call')


def _synchronising_calls(fn):
    import warnings
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [w for w in caught if 'synchroniz' in str(w.message)]


@pytest.mark.parametrize('method', ['tree', 'each'])
def test_evaluation_synchronises_only_at_the_end(method):
    """The synchronising calls of a sub-network evaluation (re-estimated statistics) do not grow with the number
    of evaluation and calibration batches."""
    model = signal_resnet18().eval()
    plans = space_plans(subnet_stages(model))[:5]

    def run(n):
        loader = [gpu_batch(n=8, seed=i) for i in range(n)]
        calib = [gpu_batch(n=8, seed=100 + i) for i in range(n)]
        return _synchronising_calls(lambda: evaluate_plans(model, plans, loader, 'cuda', bn='recalibrate',
                                                           calib_loader=calib, calib_images=8 * n, method=method))
    few, many = run(2), run(5)
    record_figure(f'sync_debug_evaluation_{method}', synchronising_calls_2_batches=len(few),
                  synchronising_calls_5_batches=len(many))
    assert len(many) == len(few)


# --- inductor graph count over many ST++ sizes -------------------------------------------------------

class CountingInductor:
    """Inductor, counting the graphs it compiled and the times compiled code ran."""

    def __init__(self):
        from torch._inductor.compile_fx import compile_fx
        self.compile_fx, self.graphs, self.calls = compile_fx, 0, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        fn = self.compile_fx(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return fn(*args)
        return run


@pytest.mark.parametrize('multiple', [1, 8], ids=['any-side', 'grid-8'])
def test_inductor_graph_count_over_many_st_pp_sizes(multiple):
    """30 ST++ steps on CUDA (crop 32; any side in 25-32, or sides 16-32 on a grid of 8: 16, 24, 32) with a model
    of two block kinds: block graphs stay within the bound per side drawn, every block call of every sub-network
    ran compiled code, and with the grid no step after the sides have all been drawn compiles anything. The
    figures (graphs per side drawn) say whether inductor on CUDA specialises block graphs on the side as it does
    on CPU (few sides: each graph costs seconds to compile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar', widths=(16, 16, 16), depths=(2, 2, 2), num_classes=10).cuda().train()
    config = {'num_subnets': 4, 'input_scale': [0.8, 1.0] if multiple == 1 else [0.5, 1.0],
              'input_size_multiple': multiple}
    task = StimulativeTask(model, config, verbose=False)
    backend = CountingInductor()
    task.compile(backend=backend)
    drawn, graphs_at, started = [], [], time.perf_counter()
    draw = task.sampler.sample
    task.sampler.sample = lambda **kw: drawn.append(draw(**kw)) or drawn[-1]
    steps = 30
    for step in range(steps):
        x, y = gpu_batch(n=16, size=32, seed=step)
        task(x, y)['loss'].backward()
        graphs_at.append(backend.graphs)
    torch.cuda.synchronize()
    sides = sorted({p.input_size for p in drawn})
    first_all = max(next(i for i, p in enumerate(drawn) if p.input_size == s) for s in sides) // 4
    record_figure(f'inductor_cuda_graphs_{"grid8" if multiple == 8 else "any_side"}', steps=steps,
                  sides_drawn=len(sides), graphs=backend.graphs, block_kinds=block_kinds(task.stages),
                  graphs_after_all_sides_drawn=backend.graphs - graphs_at[first_all],
                  seconds_incl_compilation=time.perf_counter() - started)
    per_side = block_graph_bound(task.stages) * len(task.stages)
    assert backend.graphs <= 1 + per_side * (1 + len(sides))
    assert backend.calls == steps + sum(sum(p.depths) for p in drawn)
    if multiple == 8:
        assert backend.graphs == graphs_at[first_all], 'graphs compiled after every side had been drawn'


# --- the prefetcher race of timm <= 1.0.28 -----------------------------------------------------------

class SideStreamPrefetcher:
    """Copies each batch to the GPU on a side stream and hands it to the consumer's stream without telling the
    allocator the consumer uses it (what timm <= 1.0.28's PrefetchLoader does; written here)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        stream = torch.cuda.Stream()
        current = None
        for cpu in self.batches:
            with torch.cuda.stream(stream):
                upcoming = cpu.cuda(non_blocking=True)
            if current is not None:
                yield current
            torch.cuda.current_stream().wait_stream(stream)
            current = upcoming
        yield current


def _consume(batches):
    """Each batch read only after a long kernel queued before it, while the host runs ahead."""
    seen = []
    for batch in batches:
        torch.cuda._sleep(50_000_000)
        seen.append(batch.sum())
    torch.cuda.synchronize()
    return [int(v) for v in seen]


@pytest.mark.parametrize('guarded', [False, True], ids=['unguarded-control', 'guarded'])
def test_prefetcher_race_and_guard(guarded):
    """Batch k is all k: the consumer must read k * numel for every batch. Unguarded, the side stream rewrites a
    freed batch while the consumer's queued kernels still read it (the control must see it); guarded
    (`consumer_stream_batches`, what `guard_prefetcher` applies to timm's loader), never."""
    batches = [torch.full((256, 1024), float(k)).pin_memory() for k in range(12)]
    loader = SideStreamPrefetcher(batches)
    got = _consume(consumer_stream_batches(loader) if guarded else loader)
    expected = [k * 256 * 1024 for k in range(12)]
    record_figure(f'prefetcher_{"guarded" if guarded else "unguarded"}', corrupted_batches=sum(
        g != e for g, e in zip(got, expected)))
    if guarded:
        assert got == expected
    else:
        assert got != expected, 'the control did not reproduce the race: the guarded check proves nothing here'


# --- memory of one-by-one calibration -----------------------------------------------------------------

def test_one_by_one_calibration_is_streamed():
    """The one-by-one path's peak device memory does not grow with the number of calibration batches (they stay
    in host memory, one on the device at a time)."""
    model = signal_resnet18().eval()
    plans = space_plans(subnet_stages(model))[:2]
    loader = [gpu_batch(n=4, seed=0)]

    def peak(n):
        calib = [(torch.randn(64, 3, 64, 64), torch.zeros(64, dtype=torch.long)) for _ in range(n)]  # 3 MiB each
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        evaluate_plans(model, plans, loader, 'cuda', bn='recalibrate', calib_loader=calib, calib_images=64 * n,
                       method='each')
        return torch.cuda.max_memory_allocated() - base
    few, many = peak(2), peak(10)
    record_figure('one_by_one_calibration_peak_mib', batches_2=few / 2 ** 20, batches_10=many / 2 ** 20)
    assert many - few < 3 * 2 ** 20  # less than one more calibration batch
