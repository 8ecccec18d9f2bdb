"""Test-only device module for torchrun tests of `timm-st train` (`--device-modules ddp_probe`, with tests/ on
PYTHONPATH): every rank saves its final weights to $TIMM_ST_TEST_WEIGHTS to `rank<N>.pt`, so a test can check that
DDP kept the ranks identical. With $TIMM_ST_TEST_NO_DDP set, `prepare_distributed` does nothing (the control: ranks
then train independently and must differ)."""
import os

import torch

from timm_st.method.task import StimulativeTask
from timm_st.runs.runner import Runner

_finish = Runner.finish


def _finish_and_save(self):
    outcome = _finish(self)
    path = os.path.join(os.environ['TIMM_ST_TEST_WEIGHTS'], f'rank{getattr(self.args, "rank", 0)}.pt')
    torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
    return outcome


Runner.finish = _finish_and_save
if os.environ.get('TIMM_ST_TEST_NO_DDP'):
    StimulativeTask.prepare_distributed = lambda self, *args, **kwargs: self
