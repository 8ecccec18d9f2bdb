"""Cost of one training step: common training (CT) vs stimulative training (ST, ST++).

What runs
---------
Three `timm_st.StimulativeTask`s on identically initialised copies of the same model
(default `resnet50`, SGD momentum 0.9), fed the same fixed, seeded batch:

* CT   - `{'num_subnets': 0}` (plain common training);
* ST   - `{'num_subnets': 1}` (default sampling space, plain KL);
* ST++ - `{'num_subnets': 6, 'input_scale': [0.43, 1.0], 'sample_space': 'space3',
  'loss': 'kl_direction'}`.

Each step is driven the way timm's train loop drives a task::

    with autocast: result = task(x, y)
    result['loss'].backward()          # fp16: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

The sub-network passes of ST / ST++ run inside that `backward()` (queued on the autograd engine).
The three configurations are stepped round-robin (CT, ST, ST++, CT, ...) so that a drift in
machine load affects all of them alike.

What is measured
----------------
* step time - wall time of the whole step (forward, backward incl. sub-networks, optimizer
  step; CUDA is synchronised before and after), over `--steps` timed steps after `--warmup`
  untimed ones. The table shows the median. ST plans (and so the work) vary from step to step,
  and a shared CPU has load spikes, so the *time ratio* is FLOP-matched and robust:
  median over the timed steps of (step time / that step's FLOPs), times the mean FLOPs of the
  same steps, relative to CT. Hence "time/FLOP ratio" = ratio of the median seconds per FLOP.
  The raw mean- and median-time ratios are printed / written to the JSON as well.
* FLOPs - `torch.utils.flop_counter.FlopCounterMode` over forward + backward (including every
  sub-network pass) of one step, averaged over the timed steps. ST plans are random: before the
  timed steps the sampler state is saved (`task.sampler.state_dict()`); after them it is
  restored and the same steps are replayed under the counter, so FLOPs are counted on exactly
  the sub-networks (blocks and input sizes) that were timed. The replay checks that it drew the
  same plans. With `--compile` the replay runs eagerly (an eager twin task on the same model):
  the counter cannot see inside compiled kernels, and the FLOPs are the same.
* peak memory -
  - CUDA: `torch.cuda.max_memory_allocated()` over each timed step (`reset_peak_memory_stats`
    at its start), max over steps. The three models live on the device together, so the bytes
    held at the step start by the *other* configurations are subtracted: reported =
    peak - allocated at step start + this configuration's parameters, buffers and optimizer
    state. This is the peak of everything the step of that configuration needs.
  - CPU: there is no allocator peak counter, so the column is the peak of *live bytes held by
    autograd saved tensors* during a step (forward and backward, sub-network passes included),
    measured with `torch.autograd.graph.saved_tensors_hooks` in the replay, deduplicated by
    storage, excluding parameter/buffer storages. That is the activation memory; it is exactly
    what a sub-network pass could add on top of CT (parameters, gradients and optimizer state
    are the same for all three). The hooks wrap forward and backward, so they also see the
    sub-network passes, which on CPU run inside backward on the calling thread (the script
    checks that they saw saves during backward whenever sub-networks ran). The same number is
    also recorded on CUDA in the JSON (`saved_tensor_peak_mib`).

Targets
-------
* time ratio / FLOP ratio within 5% of 1 (ST costs what its extra arithmetic costs, no
  framework overhead);
* memory ratio <= 1.05 on GPU (ST keeps CT's memory: sub-network graphs are built only after the
  main graph has been freed, one at a time). On CPU the memory ratio of the saved-tensor peak
  is expected to be ~1.00 for the same reason.

Caveats on CPU
--------------
* Timings on a shared CPU are fragile: when another process competes for the cores, the OpenMP
  threads of a step wait on each other and steps get 10-50x slower (not 2x). The script prints
  a warning when CT step times (identical work every step) vary by more than 1.5x; rerun then.
* CPU kernels are much less efficient on small feature maps (seconds per FLOP of a ResNet-50
  pass roughly doubles from 112 px to 64 px), so ST++, whose sub-networks see 48-112 px inputs
  at the CPU default size, is expected above 1.0 in time/FLOP on CPU for kernel reasons, not
  framework overhead (resizing, sampling and the KL losses are well under 1% of a step).

Reproduce (CPU defaults: batch 8, 112 px, 10 timed steps after 2 warm-up, 1-3 minutes on 2 cores)::

    python benchmarks/step_cost.py
    python benchmarks/step_cost.py --json step_cost_cpu.json

GPU (batch 64, 224 px, 20 timed steps after 5 warm-up)::

    python benchmarks/step_cost.py --device cuda --amp bf16 --channels-last --json step_cost_gpu.json

cuDNN autotuning (`--cudnn-benchmark`) is off by default: ST++ draws a new sub-network input size
(96-224 px at 224) for most passes, and autotuning every new shape inside the few timed steps
would be charged to ST++, while in a long run it amortises over the ~130 distinct sizes.
"""
import argparse
import contextlib
import json
import math
import platform
import random
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm_st.method.task import StimulativeTask

CONFIGS = [
    ('CT', {'num_subnets': 0}),
    ('ST', {'num_subnets': 1}),
    ('ST++', {'num_subnets': 6, 'input_scale': [0.43, 1.0], 'sample_space': 'space3', 'loss': 'kl_direction'}),
]
MiB = 2 ** 20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()
    except Exception:  # tensors without a storage (e.g. fake / nested): count them by identity
        return ('id', id(t)), t.numel() * t.element_size()


def _resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held between steps by one configuration: parameters, buffers, optimizer state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        key, nbytes = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


class _Packed:
    """What the pack hook stores for a saved tensor; releases its storage count when freed."""
    __slots__ = ('tensor', 'meter', 'key', '__weakref__')

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Live bytes held by autograd saved tensors (deduplicated by storage), and their peak.

    Use `hooks()` around forward *and* backward (sub-network passes run inside backward).
    Storages of `exclude` tensors (parameters, buffers) are not counted.
    """

    def __init__(self, exclude: List[torch.Tensor]):
        self.exclude = {_storage_key(t)[0] for t in exclude}
        self.refs: Dict[Any, List[int]] = {}
        self.live = 0
        self.phase = 'forward'
        self.reset()

    def reset(self) -> None:
        self.peak = self.live
        self.peak_by_phase = {'forward': self.live, 'backward': 0}
        self.saves_by_phase = {'forward': 0, 'backward': 0}

    def _pack(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key in self.exclude:
            return t
        self.saves_by_phase[self.phase] += 1
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, nbytes]
            self.live += nbytes
            if self.live > self.peak:
                self.peak = self.live
            if self.live > self.peak_by_phase[self.phase]:
                self.peak_by_phase[self.phase] = self.live
        else:
            entry[0] += 1
        return _Packed(t, self, key)

    @staticmethod
    def _unpack(p):
        return p.tensor if isinstance(p, _Packed) else p

    def _release(self, key) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.live -= entry[1]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class PlanRecorder:
    """Records the plans a task's sampler draws (wraps the sampler instance's `sample`)."""

    def __init__(self, sampler):
        self.plans: List[Any] = []
        if sampler is None:
            return
        orig = sampler.sample

        def sample(*args, **kwargs):
            plan = orig(*args, **kwargs)
            self.plans.append(plan)
            return plan

        sampler.sample = sample  # instance attribute; `_sample_takes_height` was decided at init


class Runner:
    """One configuration: model, task, optimizer, scaler, and its measurements."""

    def __init__(self, name: str, cfg: Dict[str, Any], args, device: torch.device):
        self.name, self.cfg, self.args, self.device = name, cfg, args, device
        seed_everything(args.seed)  # identical initial weights for every configuration
        model = timm.create_model(args.model, num_classes=args.num_classes)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        self.task = StimulativeTask(model, cfg, device=device, verbose=False)
        if args.compile:
            self.task.compile()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == 'fp16' else None
        amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.recorder = PlanRecorder(self.task.sampler)
        self.times: List[float] = []
        self.cuda_peaks: List[int] = []
        self.flops: List[int] = []
        self.saved_peaks: List[int] = []
        self.saved_fwd_peaks: List[int] = []
        self.saved_bwd_peaks: List[int] = []
        self.sampler_state = None
        self.timed_plans: List[Any] = []
        self.replay_plans: List[Any] = []
        self.notes: List[str] = []

    # one training step, as timm's loop does it; `before_backward` switches the meter's phase
    def step(self, task, x, y, before_backward=None) -> None:
        with self.autocast():
            result = task(x, y)
        loss = result['loss']
        if before_backward is not None:
            before_backward()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss.detach()).all():
            self.notes.append('non-finite loss')
        del result, loss

    def warmup_step(self, x, y) -> None:
        self.step(self.task, x, y)

    def start_timing(self) -> None:
        sampler = self.task.sampler
        self.sampler_state = sampler.state_dict() if sampler is not None else None
        self.plan_mark = len(self.recorder.plans)

    def timed_step(self, x, y) -> None:
        dev = self.device
        sync(dev)
        if dev.type == 'cuda':
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        self.step(self.task, x, y)
        sync(dev)
        self.times.append(time.perf_counter() - t0)
        if dev.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(dev) - base + _resident_bytes(self.model, self.optimizer)
            self.cuda_peaks.append(peak)

    def replay(self, x, y) -> None:
        """Re-run the timed steps (same plans) eagerly under FlopCounterMode and saved-tensor hooks."""
        self.timed_plans = self.recorder.plans[self.plan_mark:]
        task = self.task
        if self.args.compile:  # the counter cannot see into compiled kernels: an eager twin, same model
            task = StimulativeTask(self.model, self.cfg, device=self.device, verbose=False)
        recorder = self.recorder if task is self.task else PlanRecorder(task.sampler)
        mark = len(recorder.plans)
        if self.sampler_state is not None:
            task.sampler.load_state_dict(self.sampler_state)
        meter = SavedTensorMeter(list(self.model.parameters()) + list(self.model.buffers()))

        def to_backward():
            meter.phase = 'backward'

        for _ in range(len(self.times)):
            meter.phase = 'forward'
            meter.reset()
            counter = FlopCounterMode(display=False)
            with counter, meter.hooks():
                self.step(task, x, y, before_backward=to_backward)
            self.flops.append(counter.get_total_flops())
            self.saved_peaks.append(meter.peak)
            self.saved_fwd_peaks.append(meter.peak_by_phase['forward'])
            self.saved_bwd_peaks.append(meter.peak_by_phase['backward'])
            if meter.live:
                self.notes.append(f'{meter.live / MiB:.1f} MiB of saved tensors still alive after a step')
            if self.cfg.get('num_subnets', 1) > 0 and meter.saves_by_phase['backward'] == 0:
                self.notes.append('saved-tensor hooks saw no saves during backward: sub-network passes not measured')
        self.replay_plans = recorder.plans[mark:]
        if self.replay_plans != self.timed_plans:
            self.notes.append('replay drew different sub-network plans than the timed steps')

    def summary(self) -> Dict[str, Any]:
        out = {
            'config': self.cfg,
            'step_time_s': self.times,
            'step_time_median_s': statistics.median(self.times),
            'step_time_mean_s': statistics.fmean(self.times),
            'flops_per_step': self.flops,
            'flops_mean': statistics.fmean(self.flops),
            'saved_tensor_peak_mib': max(self.saved_peaks) / MiB,
            'saved_tensor_peak_forward_mib': max(self.saved_fwd_peaks) / MiB,
            'saved_tensor_peak_backward_mib': max(self.saved_bwd_peaks) / MiB,
            'plans': [{'blocks': [len(b) for b in p.blocks], 'input_size': p.input_size} for p in self.timed_plans],
            'notes': sorted(set(self.notes)),
        }
        if self.cuda_peaks:
            out['cuda_peak_mib'] = max(self.cuda_peaks) / MiB
        out['peak_mem_mib'] = out['cuda_peak_mib'] if self.cuda_peaks else out['saved_tensor_peak_mib']
        return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 64 on cuda, 8 on cpu')
    p.add_argument('--img-size', type=int, default=None, help='default: 224 on cuda, 112 on cpu')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default: 20 on cuda, 10 on cpu)')
    p.add_argument('--warmup', type=int, default=None, help='untimed warm-up steps (default: 5 on cuda, 2 on cpu)')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='task.compile() (the full-network path)')
    p.add_argument('--model', default='resnet50')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--cudnn-benchmark', action='store_true',
                   help='torch.backends.cudnn.benchmark = True (off by default, see the module docstring)')
    p.add_argument('--seed', type=int, default=0, help='weights and batch (the sub-network samplers use the '
                                                       "configs' own seed, 0)")
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results here')
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    for name, gpu, cpu in (('batch_size', 64, 8), ('img_size', 224, 112), ('steps', 20, 10), ('warmup', 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.steps < 1 or args.warmup < 0:
        p.error('--steps must be >= 1 and --warmup >= 0')
    return args


def _fmt_ratio(r: Optional[float]) -> str:
    return '-' if r is None or not math.isfinite(r) else f'{r:.3f}'


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    seed_everything(args.seed)
    if device.type == 'cuda':
        # off by default: ST++ draws a new input size for most sub-network passes, and autotuning each
        # new shape inside the timed steps would be charged to ST++ (in a long run it amortises)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    runners = [Runner(name, cfg, args, device) for name, cfg in CONFIGS]
    for _ in range(args.warmup):
        for r in runners:
            r.warmup_step(x, y)
    for r in runners:
        r.start_timing()
    for _ in range(args.steps):  # round-robin: load drift hits every configuration alike
        for r in runners:
            r.timed_step(x, y)
    for r in runners:
        r.replay(x, y)

    results = {r.name: r.summary() for r in runners}
    base = results['CT']
    for name, res in results.items():
        # FLOP-matched step time: typical (median) seconds per FLOP over the timed steps, times the
        # mean FLOPs of those same steps. Robust to load spikes, and compares the same work.
        res['sec_per_gflop_median'] = statistics.median(
            t / f * 1e9 for t, f in zip(res['step_time_s'], res['flops_per_step']))
        res['step_time_flop_matched_s'] = res['sec_per_gflop_median'] * res['flops_mean'] / 1e9
        res['time_ratio'] = res['step_time_flop_matched_s'] / base['step_time_flop_matched_s']
        res['time_ratio_mean'] = res['step_time_mean_s'] / base['step_time_mean_s']
        res['time_ratio_median'] = res['step_time_median_s'] / base['step_time_median_s']
        res['flop_ratio'] = res['flops_mean'] / base['flops_mean']
        res['time_per_flop_ratio'] = res['time_ratio'] / res['flop_ratio']
        res['mem_ratio'] = res['peak_mem_mib'] / base['peak_mem_mib'] if base['peak_mem_mib'] else float('nan')
        res['step_time_spread'] = max(res['step_time_s']) / min(res['step_time_s'])

    mem_what = ('CUDA max_memory_allocated per step (own params/buffers/optimizer state + step peak)'
                if device.type == 'cuda' else
                'peak live bytes of autograd saved tensors per step (activations, storage-deduplicated, '
                'params excluded; fwd+bwd incl. sub-network passes)')
    lines = [
        '| config | step time ms | FLOPs (G) | peak mem MiB | time ratio | FLOP ratio | time/FLOP ratio | mem ratio |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for name, res in results.items():
        lines.append(
            f"| {name} | {res['step_time_median_s'] * 1e3:.1f} | {res['flops_mean'] / 1e9:.2f} | "
            f"{res['peak_mem_mib']:.1f} | {_fmt_ratio(res['time_ratio'])} | {_fmt_ratio(res['flop_ratio'])} | "
            f"{_fmt_ratio(res['time_per_flop_ratio'])} | {_fmt_ratio(res['mem_ratio'])} |")
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)')
    env = (f'device: {dev_name}; torch {torch.__version__}; timm {timm.__version__}; model {args.model}; '
           f'batch {args.batch_size}; img {args.img_size}; amp {args.amp}; channels_last {args.channels_last}; '
           f'compile {args.compile}; cudnn_benchmark {args.cudnn_benchmark}; '
           f'steps {args.steps} (+{args.warmup} warm-up); seed {args.seed}')
    raw = ', '.join(f"{n} {r['time_ratio_mean']:.3f}" for n, r in results.items() if n != 'CT')
    spread = ', '.join(f"{n} {r['step_time_spread']:.2f}" for n, r in results.items())
    print('\n'.join(lines))
    print()
    print(env)
    print('step time: median of the timed steps. FLOPs: mean per step, counted on the same steps (same '
          'sub-network plans). time ratio: FLOP-matched, i.e. median over the timed steps of (step time / '
          'its FLOPs) x mean FLOPs, relative to CT; so time/FLOP ratio = ratio of median seconds per FLOP.')
    print(f'raw mean-time ratios: {raw}; step time spread max/min: {spread} '
          f'(well above ~1.3 for CT means machine load during the run).')
    print(f'peak mem: {mem_what}.')
    targets = []
    for name in ('ST', 'ST++'):
        res = results[name]
        ok_t = abs(res['time_per_flop_ratio'] - 1) <= 0.05
        line = (f"{name}: time/FLOP {res['time_per_flop_ratio']:.3f} "
                f"({'within' if ok_t else 'OUTSIDE'} 5% target)")
        if device.type == 'cuda':
            line += f"; mem ratio {res['mem_ratio']:.3f} ({'meets' if res['mem_ratio'] <= 1.05 else 'FAILS'} <= 1.05)"
        else:
            line += f"; mem ratio {res['mem_ratio']:.3f} (GPU target <= 1.05; CPU figure is activations only)"
        targets.append(line)
    print('targets: ' + ' | '.join(targets))
    if base['step_time_spread'] > 1.5:
        print(f"WARNING: CT step times vary {base['step_time_spread']:.1f}x (max/min) although every CT step does "
              f"the same work: the machine was busy and the timings are unreliable; rerun on an idle machine.")
    for name, res in results.items():
        for note in res['notes']:
            print(f'WARNING {name}: {note}')

    report = {
        'settings': vars(args),
        'env': {'device': dev_name, 'torch': torch.__version__, 'timm': timm.__version__,
                'python': sys.version.split()[0], 'threads': torch.get_num_threads()},
        'peak_mem_measures': mem_what,
        'results': results,
        'table': '\n'.join(lines),
    }
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == '__main__':
    main()
