"""Cost of one training step: the authors' ST++ loop against common training (CT), ST and ST++ as
timm-st runs them, all in one run.

What runs
---------
Identically initialised copies of one model (default `resnet50`), the same fixed seeded batch,
SGD (momentum 0.9, Nesterov, weight decay 1e-4), stepped round-robin so that a drift in machine
load hits every configuration alike:

* `authors ST++` - the authors' ST++ step, written out here as their training script runs it (not
  timm-st's code): fp32, NCHW, eager. Main forward on the batch, KL- (layer-normalised logits,
  eps 1e-7), cross-entropy, backward. Then for each of 6 sub-networks: ordered sampling from
  space3 (ResNet-50 depths 3-4-6-3) with NumPy's RNG, resize of the *previous* sub-network's
  input to a side drawn from the integers in [int(0.43 * crop), crop] (bilinear) followed by a
  second mean/std normalisation, forward through the kept blocks (BatchNorm running statistics
  updated, as theirs), KL(teacher || sub-network) on normalised logits (batchmean), backward.
  One optimizer step.
* `CT`, `ST`, `ST++` - `timm_st.StimulativeTask`s with `{'num_subnets': 0}`, `{'num_subnets': 1}`
  and the ST++ recipe's section (6 sub-networks, input_scale [0.43, 1.0], space3, kl_direction),
  driven as timm's loop drives a task (`task(x, y)`, one backward on the loss - the sub-network
  passes run inside it - optimizer step). Options, as timm-st runs them:
  - CUDA (default): bf16 autocast, channels-last, eager, as `timm-st train` runs without
    `--torchcompile` (`--compile on` for `task.compile()`: one whole-model graph for the full network,
    compiled blocks for the sub-networks; inductor compiles the blocks once per sub-network input side,
    see `timm_st.method.backends`, so give it `--input-size-multiple 8` and a warm-up that draws every
    side before timing);
  - CPU (default): fp32 (bf16 autocast is slow on CPUs without AMX), NCHW, eager (`--compile both`
    runs each configuration twice, eager and compiled, with the same caveat on per-side compilation).
  `--amp`, `--channels-last`, `--compile` override these.

What is measured
----------------
* images/s - batch size / median wall time of the whole step (forward, backward incl. sub-networks,
  optimizer step; CUDA synchronised before and after) over `--steps` timed steps after `--warmup`
  untimed ones (compilation happens during the warm-up).
* where the time goes - per step, `full pass` (forward and backward of the full network),
  `sub-networks` (every sub-network's resize, forward, loss and backward) and `optimizer` (step and
  zero_grad), from CUDA events on a GPU (no synchronisation inside the step) or `perf_counter` on
  CPU; medians. For timm-st the sub-network phase starts when the queued sub-network callback
  starts, i.e. right after the main graph's backward.
* FLOPs - `torch.utils.flop_counter.FlopCounterMode` over one step, forward and backward, every
  sub-network included, averaged over the timed steps: after timing, each configuration's sampler
  (or the authors' RNG) is rewound and the same steps are replayed eagerly
  (`torch.compiler.set_stance('force_eager')` for compiled ones) under the counter, so FLOPs are
  counted on the sub-networks that were timed (the replay checks it drew the same plans).
* time/FLOP vs CT - median over the timed steps of (step time / that step's FLOPs), relative to the
  CT configuration with the same options: the cost of a FLOP of ST compared with one of CT.
* peak memory -
  - CUDA: `torch.cuda.max_memory_allocated()` over each timed step, max over steps, minus what the
    other configurations hold on the device at the step start, plus this configuration's
    parameters, buffers and optimizer state: the peak of everything its step needs.
  - CUDA, as the allocator sees it (`--memory-steps`, default 200): after timing, each timm-st
    configuration alone runs that many more steps (ST++: a new draw of plans and sides every step;
    CT and ST, whose steps have one shape, 20) from an emptied cache; reported are its allocated peak, its reserved peak (segments the caching
    allocator holds: what runs out first when many shapes fragment it), both above what the device
    held before the phase plus its own parameters, buffers and optimizer state, and the allocator's
    retries (`num_alloc_retries`: allocations that freed the cache and tried again) and OOMs
    (`torch.cuda.memory_stats`). CPU has no caching allocator: the phase is skipped.
  - CPU: no allocator peak counter exists, so the column is the peak of live bytes held by autograd
    saved tensors during a step (forward and backward, sub-network passes included; deduplicated by
    storage, parameters excluded), from `torch.autograd.graph.saved_tensors_hooks` in the replay: the
    activation memory, which is what sub-network passes could add on top of CT.

Targets
-------
GPU: ST++ images/s >= 4x `authors ST++`; allocated peak of ST and ST++ <= 1.05x CT's and reserved
peak <= 1.10x CT's; time/FLOP of ST and ST++ within 10% of CT's.

Caveats on CPU
--------------
* On a shared CPU, when another process competes for the cores, steps get much slower; the script
  warns when CT step times (identical work every step) vary by more than 1.5x; rerun then.
* CPU kernels are less efficient on small feature maps, so ST++ (sub-networks at 43-100% of the
  side) costs more per FLOP than CT on CPU for kernel reasons.

Reproduce
---------
CPU (resnet50, batch 8, 112 px, 6 timed steps after 2 warm-up, eager; a few minutes on 2 cores)::

    python benchmarks/step_cost.py --compile off --json step_cost_cpu.json

GPU (resnet50, batch 256, the ST++ recipe's train crop 200, 20 timed steps after 5 warm-up, then
200 steps per configuration for the allocator's figures)::

    python benchmarks/step_cost.py --device cuda --json step_cost_gpu.json

cuDNN autotuning is on, as timm's train.py and `timm-st train` set it, and the task applies its own
policy (`timm_st.method.backends.subnet_cudnn_autotune`): off inside ST++'s sub-network passes, whose
sides vary without a grid, on for the full pass and for CT (`--no-cudnn-benchmark` turns it off
everywhere; `--input-size-multiple 8` puts the sides on a grid, where the task keeps it on). The
authors' step gets the same policy in its sub-network passes (their script's setting is not known
here), so neither side pays for autotuning every new side.
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
from timm.models.resnet import ResNet
from timm_st.method import task as task_module
from timm_st.method.backends import subnet_cudnn_autotune
from timm_st.method.config import StimulativeConfig
from timm_st.method.task import StimulativeTask

ST_PP = {'num_subnets': 6, 'input_scale': [0.43, 1.0], 'sample_space': 'space3', 'loss': 'kl_direction'}
CONFIGS = [('CT', {'num_subnets': 0}), ('ST', {'num_subnets': 1}), ('ST++', ST_PP)]
AUTHORS = 'authors ST++'
SPACE3 = (0, 1, 3, 0)  # the authors' ST++ space: trailing blocks a sub-network may drop per stage
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MiB = 2 ** 20
FIXED_SHAPE_MEMORY_STEPS = 20  # allocator phase of configurations that draw no input sides (CT, ST)


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
        self.reset()

    def reset(self) -> None:
        self.peak = self.live

    def _pack(self, t: torch.Tensor):
        key, nbytes = _storage_key(t)
        if key in self.exclude:
            return t
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
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


class PhaseClock:
    """Named points of one step: CUDA events on a GPU (no synchronisation inside the step),
    `perf_counter` on CPU."""

    active: Optional['PhaseClock'] = None  # the clock of the step now running (for the sub-network hook)

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.marks: Dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, start: str, end: str) -> float:
        a, b = self.marks[start], self.marks[end]
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def phases(self) -> Dict[str, float]:
        """full pass / sub-networks / optimizer, in ms (after the step has been synchronised)."""
        split = 'subnets_start' if 'subnets_start' in self.marks else 'backward_end'
        return {'full pass': self.ms('start', split), 'sub-networks': self.ms(split, 'backward_end'),
                'optimizer': self.ms('backward_end', 'end')}


def _mark_subnet_start(run):
    def timed_run(self, grad):
        if PhaseClock.active is not None:
            PhaseClock.active.mark('subnets_start')
        return run(self, grad)
    return timed_run


task_module._SubnetStep.run = _mark_subnet_start(task_module._SubnetStep.run)  # timing only; same work


class Runner:
    """One configuration: model, optimizer, its step, and its measurements."""

    def __init__(self, name: str, options: str, args, device: torch.device, channels_last: bool):
        self.name, self.options, self.args, self.device = name, options, args, device
        seed_everything(args.seed)  # identical initial weights for every configuration
        model = timm.create_model(args.model, num_classes=args.num_classes).to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.channels_last = channels_last
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                         weight_decay=1e-4)
        self.times: List[float] = []
        self.phases: Dict[str, List[float]] = {}
        self.cuda_peaks: List[int] = []
        self.flops: List[int] = []
        self.saved_peaks: List[int] = []
        self.notes: List[str] = []
        self.finite = []

    @property
    def label(self) -> str:
        return f'{self.name} [{self.options}]'

    # subclasses: one training step with clock marks start / backward_end / end (and subnets_start)
    def step(self, x, y, clock: PhaseClock) -> None:
        raise NotImplementedError

    def rewind_point(self) -> Any:
        raise NotImplementedError

    def rewind(self, point: Any) -> None:
        raise NotImplementedError

    def plans_since(self, mark: int) -> List[Any]:
        return self.drawn[mark:]

    def prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def start_timing(self) -> None:
        self.point = self.rewind_point()
        self.mark = len(self.drawn)

    def timed_step(self, x, y) -> None:
        dev = self.device
        x = self.prepare(x)
        sync(dev)
        if dev.type == 'cuda':
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        clock = PhaseClock(dev)
        PhaseClock.active = clock
        t0 = time.perf_counter()
        self.step(x, y, clock)
        sync(dev)
        self.times.append(time.perf_counter() - t0)
        PhaseClock.active = None
        for phase, ms in clock.phases().items():
            self.phases.setdefault(phase, []).append(ms)
        if dev.type == 'cuda':
            self.cuda_peaks.append(torch.cuda.max_memory_allocated(dev) - base
                                   + _resident_bytes(self.model, self.optimizer))

    def replay(self, x, y) -> None:
        """Re-run the timed steps (same plans) eagerly under FlopCounterMode and saved-tensor hooks."""
        x = self.prepare(x)
        timed = self.drawn[self.mark:]
        self.rewind(self.point)
        mark = len(self.drawn)
        meter = SavedTensorMeter(list(self.model.parameters()) + list(self.model.buffers()))
        with torch.compiler.set_stance('force_eager'):
            for _ in range(len(self.times)):
                meter.reset()
                counter = FlopCounterMode(display=False)
                with counter, meter.hooks():
                    self.step(x, y, PhaseClock(torch.device('cpu')))
                self.flops.append(counter.get_total_flops())
                self.saved_peaks.append(meter.peak)
        if self.drawn[mark:] != timed:
            self.notes.append('replay drew different sub-network plans than the timed steps')

    def allocator_phase(self, x, y, steps: int) -> None:
        """`steps` more steps of this configuration alone, from an emptied cache (CUDA): its peaks and the
        allocator's retries and OOMs as `torch.cuda.memory_stats` counts them (see the module docstring)."""
        dev = self.device
        x = self.prepare(x)
        mark = len(self.drawn)
        sync(dev)
        torch.cuda.empty_cache()
        base_allocated, base_reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_stats(dev)
        for _ in range(steps):
            self.step(x, y, PhaseClock(dev))
        sync(dev)
        after = torch.cuda.memory_stats(dev)
        own = _resident_bytes(self.model, self.optimizer)
        self.allocator = {
            'steps': steps, 'sides_drawn': len({getattr(p, 'input_size', None) for p in self.drawn[mark:]}),
            'allocated_peak_mib': (torch.cuda.max_memory_allocated(dev) - base_allocated + own) / MiB,
            'reserved_peak_mib': (torch.cuda.max_memory_reserved(dev) - base_reserved + own) / MiB,
            'alloc_retries': after.get('num_alloc_retries', 0) - before.get('num_alloc_retries', 0),
            'ooms': after.get('num_ooms', 0) - before.get('num_ooms', 0),
        }

    def summary(self) -> Dict[str, Any]:
        median = statistics.median(self.times)
        out = {
            'name': self.name, 'options': self.options,
            'step_time_s': self.times, 'step_time_median_s': median,
            'images_per_s': self.args.batch_size / median,
            'phase_ms_median': {k: statistics.median(v) for k, v in self.phases.items()},
            'flops_per_step': self.flops, 'flops_mean': statistics.fmean(self.flops),
            'sec_per_gflop_median': statistics.median(t / f * 1e9 for t, f in zip(self.times, self.flops)),
            'saved_tensor_peak_mib': max(self.saved_peaks) / MiB,
            'step_time_spread': max(self.times) / min(self.times),
            'notes': sorted(set(self.notes)),
        }
        if self.cuda_peaks:
            out['cuda_peak_mib'] = max(self.cuda_peaks) / MiB
        if getattr(self, 'allocator', None):
            out['allocator'] = self.allocator
        out['peak_mem_mib'] = out.get('cuda_peak_mib', out['saved_tensor_peak_mib'])
        return out


class TaskRunner(Runner):
    """CT / ST / ST++ as timm-st runs them: a `StimulativeTask` driven like timm's loop."""

    def __init__(self, name, cfg, args, device, amp: str, channels_last: bool, compiled: bool):
        options = f"{amp if amp != 'none' else 'fp32'}, {'channels-last' if channels_last else 'NCHW'}, " \
                  f"{'compiled' if compiled else 'eager'}"
        super().__init__(name, options, args, device, channels_last)
        self.task = StimulativeTask(self.model, cfg, device=device, verbose=False)
        if compiled:
            self.task.compile(backend=args.backend)
        amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if amp == 'fp16' else None
        self.drawn: List[Any] = []
        sampler = self.task.sampler
        if sampler is not None:
            draw = sampler.sample

            def sample(*a, **kw):
                plan = draw(*a, **kw)
                self.drawn.append(plan)
                return plan
            sampler.sample = sample  # instance attribute; the task decided its call signature at init

    def step(self, x, y, clock):
        clock.mark('start')
        with self.autocast():
            loss = self.task(x, y)['loss']
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            clock.mark('backward_end')
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            clock.mark('backward_end')
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark('end')
        self.finite.append(loss.detach())  # checked once after the run: no host sync inside the step

    def rewind_point(self):
        sampler = self.task.sampler
        return sampler.state_dict() if sampler is not None else None

    def rewind(self, point):
        if point is not None:
            self.task.sampler.load_state_dict(point)


def authors_subnet_cudnn():
    """cuDNN autotuning in the authors' sub-network passes: timm-st's ST++ policy (off while sides vary), so
    that the comparison measures the two steps, not autotuning every side in one of them."""
    return subnet_cudnn_autotune(StimulativeConfig.from_dict(ST_PP))


def authors_normalized_logits(z: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(z, z.shape[-1:], eps=1e-7)


def authors_subnet_forward(model: ResNet, x: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """A timm ResNet with only the first `keep[s]` blocks of stage `s`."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    for layer, k in zip((model.layer1, model.layer2, model.layer3, model.layer4), keep):
        for block in list(layer)[:k]:
            x = block(x)
    return model.forward_head(x)


class AuthorsRunner(Runner):
    """The authors' ST++ step (see the module docstring): fp32, NCHW, eager."""

    def __init__(self, args, device):
        super().__init__(AUTHORS, 'fp32, NCHW, eager', args, device, channels_last=False)
        if not isinstance(self.model, ResNet):
            raise SystemExit(f'the authors-way configuration needs a timm ResNet, not {type(self.model).__name__}')
        self.depths = tuple(len(l) for l in (self.model.layer1, self.model.layer2, self.model.layer3,
                                             self.model.layer4))
        self.max_drop = SPACE3 if self.depths == (3, 4, 6, 3) else tuple(d - 1 for d in self.depths)
        self.rng = np.random.RandomState(0)
        self.low, self.high = int(0.43 * args.img_size), args.img_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.drawn = []

    def step(self, x, y, clock):
        model = self.model
        clock.mark('start')
        z = authors_normalized_logits(model(x))
        F.cross_entropy(z, y).backward()
        clock.mark('subnets_start')
        teacher = F.softmax(z.detach(), dim=-1)
        xs = x
        with authors_subnet_cudnn():  # the same cuDNN policy as timm-st's ST++ (see the module docstring)
            self._subnets(model, xs, teacher)
        clock.mark('backward_end')
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark('end')
        self.finite.append(z.detach())

    def _subnets(self, model, xs, teacher):
        for _ in range(ST_PP['num_subnets']):
            keep = [d - self.rng.randint(0, m + 1) for d, m in zip(self.depths, self.max_drop)]
            side = self.rng.randint(self.low, self.high + 1)
            self.drawn.append((tuple(keep), side))
            xs = F.interpolate(xs, size=(side, side), mode='bilinear', align_corners=False)
            xs = (xs - self.mean) / self.std
            u = authors_normalized_logits(authors_subnet_forward(model, xs, keep))
            F.kl_div(F.log_softmax(u, dim=-1), teacher, reduction='batchmean').backward()

    def rewind_point(self):
        return self.rng.get_state()

    def rewind(self, point):
        self.rng.set_state(point)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, default=None, help='default: 256 on cuda, 8 on cpu')
    p.add_argument('--img-size', type=int, default=None, help='default: 200 (the ST++ train crop) on cuda, 112 on cpu')
    p.add_argument('--steps', type=int, default=None, help='timed steps (default: 20 on cuda, 6 on cpu)')
    p.add_argument('--warmup', type=int, default=None, help='untimed warm-up steps (default: 5 on cuda, 2 on cpu)')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default=None,
                   help='timm-st configurations (default: bf16 on cuda, none on cpu)')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='timm-st configurations (default: on for cuda, off for cpu)')
    p.add_argument('--compile', choices=('on', 'off', 'both'), default=None,
                   help='timm-st configurations: task.compile(), eager, or each twice (default: off, as '
                        'timm-st train without --torchcompile)')
    p.add_argument('--backend', default='inductor', help='torch.compile backend')
    p.add_argument('--input-size-multiple', type=int, default=1,
                   help="timm-st ST++: stimulative.input_size_multiple (1: any side, as the recipe)")
    p.add_argument('--no-authors', action='store_true', help="skip the authors' configuration")
    p.add_argument('--model', default='resnet50')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--cudnn-benchmark', action=argparse.BooleanOptionalAction, default=True,
                   help='torch.backends.cudnn.benchmark, as training sets it (default: on; the task turns it off '
                        'inside sub-network passes while sides vary without a grid)')
    p.add_argument('--memory-steps', type=int, default=None,
                   help='CUDA: steps per timm-st configuration for the allocator figures (default: 200 on cuda, '
                        '0 on cpu, where there is no caching allocator)')
    p.add_argument('--seed', type=int, default=0, help='weights and batch (the samplers use their own seed, 0)')
    p.add_argument('--json', default=None, metavar='PATH', help='also write the results here')
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    for name, gpu, cpu in (('batch_size', 256, 8), ('img_size', 200, 112), ('steps', 20, 6), ('warmup', 5, 2),
                           ('amp', 'bf16', 'none'), ('channels_last', True, False), ('compile', 'off', 'off'),
                           ('memory_steps', 200, 0)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.steps < 1 or args.warmup < 0 or args.input_size_multiple < 1 or args.memory_steps < 0:
        p.error('--steps and --input-size-multiple must be >= 1, --warmup and --memory-steps >= 0')
    if args.memory_steps and not cuda:
        p.error('--memory-steps needs --device cuda (the caching allocator is what it measures)')
    return args


def _ratio(r: Optional[float]) -> str:
    return '-' if r is None or not math.isfinite(r) else f'{r:.2f}'


def measure(args, device: torch.device) -> Tuple[Dict[str, Dict[str, Any]], float]:
    """Every configuration's step, warm-up then timed round-robin (and the allocator phase): results by label."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    seed_everything(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)

    st_pp = dict(ST_PP, **({'input_size_multiple': args.input_size_multiple} if args.input_size_multiple > 1 else {}))
    configs = [(name, st_pp if cfg is ST_PP else cfg) for name, cfg in CONFIGS]
    compiled = {'on': [True], 'off': [False], 'both': [False, True]}[args.compile]
    runners: List[Runner] = [] if args.no_authors else [AuthorsRunner(args, device)]
    for c in compiled:
        runners += [TaskRunner(name, cfg, args, device, args.amp, args.channels_last, c) for name, cfg in configs]

    t_start = time.perf_counter()
    for _ in range(args.warmup):
        for r in runners:
            r.step(r.prepare(x), y, PhaseClock(device))
    sync(device)
    warmup_s = time.perf_counter() - t_start
    for r in runners:
        r.start_timing()
    for _ in range(args.steps):  # round-robin: load drift hits every configuration alike
        for r in runners:
            r.timed_step(x, y)
    for r in runners:
        if not all(torch.isfinite(v).all() for v in r.finite):
            r.notes.append('non-finite loss')
        r.replay(x, y)
    if args.memory_steps:
        for r in runners:
            if isinstance(r, TaskRunner):  # one batch shape for CT and ST: their figures settle in a few steps
                fixed = r.task.config.input_scale is None
                r.allocator_phase(x, y, min(args.memory_steps, FIXED_SHAPE_MEMORY_STEPS) if fixed else args.memory_steps)

    return {r.label: r.summary() for r in runners}, warmup_s


def add_ratios(results: Dict[str, Dict[str, Any]]) -> None:
    """Each configuration against CT with the same options, the authors' way, and its eager twin."""
    authors = results.get(f'{AUTHORS} [fp32, NCHW, eager]')
    for res in results.values():
        ct = next((o for o in results.values() if o['name'] == 'CT' and o['options'] == res['options']), None)
        if ct is not None:
            res['time_per_flop_vs_ct'] = res['sec_per_gflop_median'] / ct['sec_per_gflop_median']
            res['flops_vs_ct'] = res['flops_mean'] / ct['flops_mean']
            res['mem_vs_ct'] = res['peak_mem_mib'] / ct['peak_mem_mib'] if ct['peak_mem_mib'] else float('nan')
            if 'allocator' in res and 'allocator' in ct:
                for key in ('allocated_peak_mib', 'reserved_peak_mib'):
                    res['allocator'][key.replace('_mib', '_vs_ct')] = res['allocator'][key] / ct['allocator'][key]
        if authors is not None:
            res['images_per_s_vs_authors'] = res['images_per_s'] / authors['images_per_s']
        if res['options'].endswith('compiled'):
            eager = results.get(f"{res['name']} [{res['options'][:-len('compiled')]}eager]")
            if eager is not None:
                res['compiled_vs_eager_step_time'] = res['step_time_median_s'] / eager['step_time_median_s']


def tables(args, results: Dict[str, Dict[str, Any]]) -> List[str]:
    """The Markdown tables: the step per configuration, and the allocator phase when measured."""
    lines = [
        '| config | options | images/s | step ms | full pass ms | sub-networks ms | optimizer ms | GFLOPs | '
        'peak mem MiB | time/FLOP vs CT | mem vs CT | images/s vs authors |',
        '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for res in results.values():
        ph = res['phase_ms_median']
        lines.append(
            f"| {res['name']} | {res['options']} | {res['images_per_s']:.1f} | {res['step_time_median_s'] * 1e3:.1f} | "
            f"{ph['full pass']:.1f} | {ph['sub-networks']:.1f} | {ph['optimizer']:.1f} | {res['flops_mean'] / 1e9:.1f} | "
            f"{res['peak_mem_mib']:.0f} | {_ratio(res.get('time_per_flop_vs_ct'))} | {_ratio(res.get('mem_vs_ct'))} | "
            f"{_ratio(res.get('images_per_s_vs_authors'))} |")
    if args.memory_steps:
        lines += ['', f'Allocator, {args.memory_steps} steps per configuration (CUDA memory_stats):', '',
                  '| config | options | sides drawn | allocated peak MiB | reserved peak MiB | allocated vs CT | '
                  'reserved vs CT | alloc retries | OOMs |',
                  '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
        for res in results.values():
            a = res.get('allocator')
            if a:
                lines.append(f"| {res['name']} | {res['options']} | {a['sides_drawn']} | {a['allocated_peak_mib']:.0f} | "
                             f"{a['reserved_peak_mib']:.0f} | {_ratio(a.get('allocated_peak_vs_ct'))} | "
                             f"{_ratio(a.get('reserved_peak_vs_ct'))} | {a['alloc_retries']} | {a['ooms']} |")
    return lines


def target_lines(results: Dict[str, Dict[str, Any]], device: torch.device) -> List[str]:
    """The issue's targets for ST and ST++, met or not, as measured."""
    targets = []
    for res in results.values():
        if res['name'] not in ('ST', 'ST++'):
            continue
        parts = []
        if 'time_per_flop_vs_ct' in res:
            ok = abs(res['time_per_flop_vs_ct'] - 1) <= 0.10
            parts.append(f"time/FLOP vs CT {res['time_per_flop_vs_ct']:.2f} ({'within' if ok else 'OUTSIDE'} 10%)")
            if device.type == 'cuda':
                ok = res['mem_vs_ct'] <= 1.05
                parts.append(f"peak mem vs CT {res['mem_vs_ct']:.2f} ({'meets' if ok else 'FAILS'} <= 1.05)")
                a = res.get('allocator', {})
                if 'reserved_peak_vs_ct' in a:
                    ok = a['allocated_peak_vs_ct'] <= 1.05 and a['reserved_peak_vs_ct'] <= 1.10
                    parts.append(f"over {a['steps']} steps: allocated {a['allocated_peak_vs_ct']:.2f}, reserved "
                                 f"{a['reserved_peak_vs_ct']:.2f} x CT ({'meets' if ok else 'FAILS'} <= 1.05 / 1.10), "
                                 f"{a['alloc_retries']} retries")
            else:
                parts.append(f"activation peak vs CT {res['mem_vs_ct']:.2f} (GPU target <= 1.05)")
        if res['name'] == 'ST++' and 'images_per_s_vs_authors' in res:
            ok = res['images_per_s_vs_authors'] >= 4
            parts.append(f"images/s vs authors {res['images_per_s_vs_authors']:.2f}x "
                         f"({'meets' if ok else 'below'} the GPU target 4x)")
        if 'compiled_vs_eager_step_time' in res:
            ok = res['compiled_vs_eager_step_time'] <= 1.0
            parts.append(f"compiled/eager step time {res['compiled_vs_eager_step_time']:.2f} "
                         f"({'no slower' if ok else 'SLOWER'})")
        targets.append(f"{res['name']} [{res['options']}]: " + '; '.join(parts))
    return targets


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    results, warmup_s = measure(args, device)
    add_ratios(results)
    lines = tables(args, results)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (
        f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)')
    env = (f'device: {dev_name}; torch {torch.__version__}; timm {timm.__version__}; model {args.model}; '
           f'batch {args.batch_size}; img {args.img_size}; steps {args.steps} (+{args.warmup} warm-up, '
           f'{warmup_s:.0f} s incl. compilation); backend {args.backend}; cudnn_benchmark {args.cudnn_benchmark}; '
           f'input_size_multiple {args.input_size_multiple}; seed {args.seed}')
    mem_what = ('CUDA max_memory_allocated per step (own params/buffers/optimizer state + step peak)'
                if device.type == 'cuda' else
                'peak live bytes of autograd saved tensors per step (activations; fwd+bwd incl. sub-networks)')
    print('\n'.join(lines))
    print()
    print(env)
    print('images/s and phases: medians over the timed steps. time/FLOP vs CT: median seconds per FLOP relative '
          'to CT with the same options. peak mem: ' + mem_what + '.')

    targets = target_lines(results, device)
    print('targets:\n  ' + '\n  '.join(targets))
    for res in results.values():
        if res['name'] == 'CT' and res['step_time_spread'] > 1.5:
            print(f"WARNING: {res['name']} [{res['options']}] step times vary {res['step_time_spread']:.1f}x (max/min) "
                  f"although every CT step does the same work: the machine was busy; rerun on an idle machine.")
        for note in res['notes']:
            print(f"WARNING {res['name']} [{res['options']}]: {note}")

    report = {
        'settings': vars(args),
        'env': {'device': dev_name, 'torch': torch.__version__, 'timm': timm.__version__,
                'python': sys.version.split()[0], 'threads': torch.get_num_threads(), 'warmup_s': warmup_s},
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
