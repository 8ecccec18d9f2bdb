"""A guard for timm's `PrefetchLoader` on timm releases whose prefetcher lets a batch's GPU memory be reused
while the training step still reads it.

The prefetcher copies each batch on a side CUDA stream and the step consumes it on the current one. Up to timm
1.0.28 nothing tells the caching allocator that the current stream uses the batch, so once the step drops it a
later copy on the side stream may overwrite it while queued kernels still read it. timm's train.py waits for the
GPU every step (`loss.item()`) and never meets this; timm-st reads values back only on log steps, so it can.
timm 1.0.31's fixed prefetcher waits for the consumer and keeps its stream in a persistent `stream` attribute,
which is how `guard_prefetcher` tells the two apart. For timm >= 1.0.27 (the train.py releases the hook
supports), each batch an unfixed prefetcher yields is recorded on the stream current when it is yielded
(`Tensor.record_stream`), so the allocator reuses its memory only after that stream's work has finished.
"""
from typing import Any, Dict, Iterable, Iterator

import torch

__all__ = ['guard_prefetcher', 'consumer_stream_batches', 'prefetcher_waits_for_consumer']

_GUARDED: Dict[type, type] = {}


def consumer_stream_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield `batches` (a tensor, or a tuple/list of them), each CUDA tensor recorded on the stream current
    when it is yielded, i.e. the stream of the code that consumes it."""
    for batch in batches:
        for tensor in (batch if isinstance(batch, (tuple, list)) else (batch,)):
            if getattr(tensor, 'is_cuda', False):
                tensor.record_stream(torch.cuda.current_stream(tensor.device))
        yield batch


def prefetcher_waits_for_consumer(loader: Any) -> bool:
    """Whether a timm `PrefetchLoader` makes its side stream wait for the consumer before each copy (the
    fixed prefetcher, which keeps its stream in a `stream` attribute from construction on)."""
    return 'stream' in vars(loader)


def _guarded_class(cls: type) -> type:
    if cls not in _GUARDED:
        def __iter__(self):
            return consumer_stream_batches(cls.__iter__(self))
        _GUARDED[cls] = type(f'StreamGuarded{cls.__name__}', (cls,), {'__iter__': __iter__, '__module__': __name__})
    return _GUARDED[cls]


def guard_prefetcher(loader: Any) -> Any:
    """`loader` itself, guarded when it is a timm `PrefetchLoader` on CUDA whose prefetcher does not wait for
    its consumer (its class becomes a subclass whose iterator records each batch on the consumer's stream, so
    `isinstance` checks and attributes are unchanged); any other loader is returned as it is."""
    from timm.data.loader import PrefetchLoader
    if not isinstance(loader, PrefetchLoader) or not getattr(loader, 'is_cuda', False):
        return loader
    if prefetcher_waits_for_consumer(loader) or type(loader) in _GUARDED.values():
        return loader
    loader.__class__ = _guarded_class(type(loader))
    return loader
