"""The guard for timm's prefetcher before it waited for its consumer (issue 16.9): which timm needs it, and that a
guarded loader records every batch it yields on the stream current at that moment (the GPU race itself is shown
in test_gpu.py)."""
import inspect

import pytest
import torch
from timm.data.loader import PrefetchLoader

from timm_st.prefetch import guard_prefetcher, prefetcher_waits_for_consumer


def _loader(device='cpu'):
    return PrefetchLoader([(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2))], device=torch.device(device))


def test_detection_agrees_with_timms_prefetcher_code():
    """The attribute the guard looks for goes with a prefetcher that waits for its consumer (timm >= 1.0.31 here,
    and not 1.0.27: run this file with both)."""
    source = inspect.getsource(PrefetchLoader.__iter__)
    assert prefetcher_waits_for_consumer(_loader()) == ('wait_stream(consumer_stream)' in source)


class FakeCudaTensor:
    """Stands for a CUDA tensor: records the streams it is recorded on."""
    is_cuda = True
    device = 'cuda:0'

    def __init__(self, name):
        self.name, self.streams = name, []

    def record_stream(self, stream):
        self.streams.append(stream)


def test_guarded_loader_records_each_batch_on_the_consumer_stream(monkeypatch):
    batches = [(FakeCudaTensor(f'x{i}'), FakeCudaTensor(f'y{i}')) for i in range(3)]
    monkeypatch.setattr(PrefetchLoader, '__iter__', lambda self: iter(batches))  # an unfixed prefetcher's batches
    consumer = {'stream': 'consumer-0'}
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: consumer['stream'])
    loader = _loader()
    vars(loader).pop('stream', None)  # as timm <= 1.0.28 builds it
    loader.is_cuda = True
    guarded = guard_prefetcher(loader)
    assert guarded is loader and isinstance(loader, PrefetchLoader) and len(loader) == 1
    assert guard_prefetcher(loader) is loader and type(loader).__mro__[1] is PrefetchLoader  # guarded once
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch)
        assert [t.streams for t in batch] == [[f'consumer-{i}']] * 2  # recorded when yielded
        consumer['stream'] = f'consumer-{i + 1}'  # the consumer may switch streams between batches
    assert seen == batches


@pytest.mark.parametrize('case', ['cpu', 'fixed-prefetcher', 'not-a-prefetcher'])
def test_loaders_that_need_no_guard_are_unchanged(case):
    loader = _loader()
    if case == 'fixed-prefetcher':
        loader.is_cuda = True
        loader.stream = None
    if case == 'not-a-prefetcher':
        loader = [1, 2]
    before = type(loader)
    assert guard_prefetcher(loader) is loader and type(loader) is before
