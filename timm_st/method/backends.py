"""How the step uses the compiler and cuDNN: compiled blocks, their graph bound, compile modes, and
cuDNN autotuning in sub-network passes.

Compiled blocks. `StimulativeTask.compile()` compiles each block of the stages in place
(`nn.Module.compile`, dynamic shapes) for the sub-network passes. Blocks that print alike share
compiled code (`block_kinds`); each kind gets one graph per calling context (`BLOCK_CONTEXTS`) and
shape bucket (`SHAPE_BUCKETS`), whatever plans are drawn (`block_graph_bound`), with a compiler that
keeps sizes symbolic. Inductor specialises block graphs on the feature-map side, so with it that bound
holds per distinct sub-network input side (`BlockGraphBudget`, which raises dynamo's recompile limits
as sides are drawn, so compiled code never falls back to eager silently). The analysis code and
BatchNorm re-estimation run these blocks eagerly (`eager_blocks`): they add no graphs, and the swapped
statistics and per-batch momenta they use would otherwise each be guarded on.

Compile modes. Every `torch.compile` mode is accepted (`check_compile_mode` refuses only modes torch
does not know, or a mode with a backend that takes none). Modes with CUDA graphs apply to the
whole-model graph of the full pass, whose shapes and parameters are fixed; the blocks get the same
options minus CUDA graphs (`block_compile_options`): blocks of one kind share code but not parameter
addresses, sizes vary, and the sub-network passes run inside backward following random plans, so a
recorded graph would neither be reused nor be safe to replay.

cuDNN autotuning. With `torch.backends.cudnn.benchmark` on, every new input shape autotunes every
convolution. ST++ draws a new side for most sub-network passes (about 115 sides at crop 200), so
`subnet_cudnn_autotune(config)` turns autotuning off inside sub-network passes when sides vary and no
size grid is set (`input_scale` with `input_size_multiple: 1`); otherwise, and in the full pass, it
stays as the caller set it.
"""
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    'BLOCK_CONTEXTS', 'SHAPE_BUCKETS', 'block_kinds', 'block_graph_bound', 'BlockGraphBudget', 'raise_recompile_limits',
    'check_compile_mode', 'block_compile_options', 'eager_blocks', 'subnet_cudnn_autotune',
]

# Calling contexts in which a compiled block runs, each with its own graph (dynamo guards on the BatchNorm flags,
# train/eval mode and grad mode): a sub-network pass (train mode, gradients, `bn: freeze` or `bn: update`), and
# the model called directly in train mode with gradients, in train mode without, and in eval mode.
BLOCK_CONTEXTS = 4
# Shape buckets per block and context under dynamic shapes (square inputs, batch >= 2): dynamo specialises a side
# of 1, so a block gets one graph for input side 1, one for side 2 when a strided layer inside it turns that into 1
# (a downsampling block), and one shared by every other side.
SHAPE_BUCKETS = 3
# Dynamo's defaults, kept as headroom for what else a program compiles (the whole-model graph shares the cache of
# `nn.Module._call_impl` with the in-place compiled blocks).
_DEFAULT_LIMITS = {'recompile_limit': 8, 'accumulated_recompile_limit': 256}
_OLD_LIMIT_NAMES = {'recompile_limit': 'cache_size_limit', 'accumulated_recompile_limit': 'accumulated_cache_size_limit'}
_requested_graphs = 0  # graphs all compile() calls may need (dynamo's limits count per code object)


def block_kinds(stages: Iterable[Any]) -> int:
    """Distinct block kinds of the stages: blocks whose module trees print alike (class, widths, strides,
    drop rates) trace to the same graphs, so compiled code is shared between them (dynamo inlines
    modules without guarding their identity; before torch 2.5 it does guard it: every block is a kind).
    With `drop_path_rate > 0` every block prints its own rate, so every block is its own kind."""
    blocks = [block for stage in stages for block in stage.container._modules.values()]
    return len(blocks) if torch.__version__ < '2.5' else len({repr(block) for block in blocks})


def block_graph_bound(stages: Iterable[Any]) -> int:
    """The most block graphs a shape-generic compiler compiles for any plans, sizes and calling contexts:
    `block_kinds x BLOCK_CONTEXTS x SHAPE_BUCKETS` (per feature-map side with inductor, `BlockGraphBudget`)."""
    return block_kinds(stages) * BLOCK_CONTEXTS * SHAPE_BUCKETS


class BlockGraphBudget:
    """Keeps dynamo's recompile limits above what the compiled blocks can need (module docstring).

    Inductor (torch 2.14) specialises each block's backward graph on the spatial size of its input (its
    convolution-backward lowering turns the strides into constants), so every distinct sub-network input
    side adds up to `block_graph_bound(stages) x len(stages)` graphs (each kind sees one feature-map side
    per stage). `admit` raises the limits by that much for each side the first time it is drawn: about 115
    sides at crop 200 with `input_scale: [0.43, 1.0]`, 15 with `input_size_multiple: 8`.
    """

    def __init__(self, stages: Iterable[Any]):
        stages = list(stages)
        self.per_side = block_graph_bound(stages) * len(stages)
        self.sides = set()
        raise_recompile_limits(self.per_side)  # the batch's own side, in every context

    def admit(self, sides: Iterable[int]) -> None:
        """Make room for the graphs of sub-network input `sides` not seen before."""
        for side in set(sides) - self.sides:
            self.sides.add(side)
            raise_recompile_limits(self.per_side)


def raise_recompile_limits(graphs: int) -> None:
    """Let dynamo keep `graphs` more graphs of one compiled function, above its defaults, in both of its
    limits: the per-function one and the total (`accumulated_`) one. Both count per code object, and every
    in-place compiled module shares `nn.Module._call_impl`; past either limit dynamo runs eagerly."""
    global _requested_graphs
    _requested_graphs += graphs
    config = torch._dynamo.config
    for name, default in _DEFAULT_LIMITS.items():
        key = name if hasattr(config, name) else _OLD_LIMIT_NAMES[name]
        setattr(config, key, max(getattr(config, key), default + _requested_graphs))


def check_compile_mode(backend: Any, mode: Optional[str]) -> None:
    """Raise ValueError (one line naming the value and the fix) for a `torch.compile` mode that torch does
    not know, or a mode given with a backend other than inductor (which would fail at the first step).
    Run validation calls this for `--torchcompile BACKEND --torchcompile-mode MODE` before any work."""
    if mode is None:
        return
    from torch._inductor import list_mode_options
    modes = sorted(list_mode_options())
    if mode not in modes:
        raise ValueError(f'torchcompile_mode: got {mode!r}; allowed: {", ".join(modes)} (or leave it unset)')
    if isinstance(backend, str) and backend != 'inductor' and mode != 'default':
        raise ValueError(f'torchcompile_mode: {mode!r} is an inductor mode but the backend is {backend!r}; '
                         f'use --torchcompile inductor or leave the mode unset')


def block_compile_options(backend: Any, mode: Optional[str], options: Optional[Dict[str, Any]]
                          ) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """`(mode, options)` for compiling the blocks: those of the full network, minus CUDA graphs (see the
    module docstring). A mode without CUDA graphs, or a backend other than inductor, passes unchanged."""
    if backend != 'inductor':
        return mode, options
    from torch._inductor import list_mode_options
    merged = {**(list_mode_options(mode, True) if mode else {}), **(options or {})}  # (None lists every mode)
    if not merged.get('triton.cudagraphs'):
        return mode, options
    merged['triton.cudagraphs'] = False
    return None, merged


@contextmanager
def eager_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, the modules of `model` compiled in place (`nn.Module.compile`, as `compile()`
    does with the blocks) run their eager forward; their compiled code is put back on exit."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules()
                if getattr(m, '_compiled_call_impl', None) is not None]
    try:
        for m, _ in compiled:
            m._compiled_call_impl = None
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


@contextmanager
def subnet_cudnn_autotune(config: Any) -> Iterator[None]:
    """The cuDNN autotuning policy of sub-network passes (see the module docstring): off while sides vary
    without a size grid, else the caller's setting (restored on exit)."""
    saved = torch.backends.cudnn.benchmark
    if config.input_scale is not None and config.input_size_multiple == 1:
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
