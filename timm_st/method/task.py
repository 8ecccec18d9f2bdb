"""`StimulativeTask`: stimulative training (ST / ST++) as a timm `TrainingTask`.

One step, as timm's loop drives it (`result = task(x, y)`, one backward on `result['loss']`,
one optimizer step):

1. forward: the full network runs and its loss is returned through `_RunSubnetsAfterBackward`;
2. the loop's backward processes the main graph (freeing it), then the engine runs our queued
   callback, which for each sampled plan resizes the original batch, runs the sub-network and
   backpropagates `coef * loss_i` scaled by the gradient the main loss received (this carries
   GradScaler's scale and the loop's 1/accum division), one sub-network graph at a time;
3. the optimizer step sees the sum of all gradients, exactly those of
   `main_loss + coef * sum_i loss_i`.

Under DDP the main pass and all but the last sub-network bypass the DDP wrapper; the last
sub-network runs through it, so DDP's single reduction covers every accumulated gradient
(DDP counts parameters used during its no-sync passes as used) and happens after all of them.
"""
import inspect
import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from timm.task import TrainingTask
from timm.utils import distribute_bn

from .adapters import subnet_stages, use_subnet, stage_depths
from .backends import BlockGraphBudget, block_compile_options, check_compile_mode, subnet_cudnn_autotune
from .batchnorm import frozen_running_stats, recalibrate_bn
from .config import StimulativeConfig
from .losses import normalize_logits
from .plan import SubnetPlan, resize_input
from .sampling import OrderedSubnetSampler, RandomSubnetSampler, resolve_sample_space

__all__ = ['StimulativeTask']

_logger = logging.getLogger(__name__)


class _ModelRunner(nn.Module):
    """What DDP wraps: the model as `module` (so timm's `unwrap_model` finds it), called either through
    the main path (the whole-model compiled graph after `compile()`) or, for a sub-network, through the
    model itself, whose blocks `compile()` compiles in place."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        object.__setattr__(self, 'main', model)  # not registered: may be a compiled wrapper of `module`

    def forward(self, x: torch.Tensor, subnet: bool = False) -> torch.Tensor:
        return self.module(x) if subnet else self.main(x)


class _SubnetStep:
    """What one step's sub-network passes need, captured at forward time."""

    def __init__(self, task: 'StimulativeTask', x, target, teacher, plans: List[SubnetPlan], coef: float):
        self.task, self.x, self.target, self.plans, self.coef = task, x, target, plans, coef
        # a copy: the logits may be a compiled graph's output, which a later replay of that graph (CUDA
        # graphs) can overwrite in place while the sub-network passes still read the teacher
        self.teacher = teacher.clone()
        self.device_type = x.device.type
        self.autocast = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)

    def run(self, grad: torch.Tensor) -> None:
        task = self.task
        budget = getattr(task, '_block_budget', None)  # set by compile()
        if budget is not None:
            budget.admit({plan.input_size or self.x.shape[-2] for plan in self.plans})
        losses = []
        with torch.enable_grad(), torch.autocast(self.device_type, self.autocast_dtype, enabled=self.autocast), \
                subnet_cudnn_autotune(task.config):
            for i, plan in enumerate(self.plans):
                last = i == len(self.plans) - 1
                x = resize_input(self.x, plan.input_size)
                with use_subnet(task.stages, plan), task._subnet_norm_context():
                    output = task._run(x, subnet=True, sync=last)
                    with torch.autocast(self.device_type, enabled=False):
                        loss = task._subnet_loss(output.float(), self.teacher, self.target)
                    (loss * (self.coef * grad)).backward()
                losses.append(loss.detach())
        task.subnet_loss = torch.stack(losses).mean()


class _RunSubnetsAfterBackward(torch.autograd.Function):
    """Identity on the main loss whose backward queues the sub-network passes to run once the
    engine has finished the main graph."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, step: _SubnetStep) -> torch.Tensor:
        ctx.step = step
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        step, ctx.step = ctx.step, None
        if step is not None:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: step.run(grad))
        return grad, None


class StimulativeTask(TrainingTask):
    """Stimulative training: the full network's loss plus, per step, `num_subnets` sampled
    sub-networks trained to imitate the full network's detached prediction.

    Args:
        model: A residual timm model with a sub-network adapter (see `register_subnet_adapter`).
        config: The recipe's `stimulative:` section (dict) or a `StimulativeConfig`.
        criterion: Main-network loss (as given to timm's ClassificationTask); cross-entropy when None.
        sampler: Any object with `sample()` returning a `SubnetPlan` (a `sample(input_height)`
            signature receives the batch height); built from the config when None.
        num_epochs: Total epochs, needed by the cosine coefficient schedules.
        device, dtype, verbose: As for timm's tasks.

    `task.set_epoch(e)` tells the task the epoch; `task.subnet_loss` is the mean sub-network loss
    of the last step (a tensor, set after backward; None when no sub-network ran). `task.train_steps`
    counts the training steps (calls with gradients enabled, one per micro-batch) that `subnet_interval`
    selects from; it is checkpointed with the sampler's state, so a resumed run continues both.
    """

    def __init__(self, model: nn.Module, config: Union[None, Mapping[str, Any], StimulativeConfig] = None,
                 criterion: Optional[Callable] = None, sampler: Optional[Any] = None, num_epochs: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, verbose: bool = True):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.config = config if isinstance(config, StimulativeConfig) else StimulativeConfig.from_dict(config)
        cfg = self.config
        if cfg.coef_schedule != 'constant' and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(
                f'stimulative.coef_schedule: {cfg.coef_schedule!r} needs the total number of epochs; '
                f'pass num_epochs (got {num_epochs!r})')
        self.num_epochs = num_epochs
        self.trainable_module = model
        object.__setattr__(self, '_runner', _ModelRunner(model))
        criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.criterion = criterion.to(self.device) if isinstance(criterion, nn.Module) else criterion
        self.epoch = 0
        self.train_steps = 0  # training steps taken (calls with gradients enabled): the next step's index
        self.subnet_loss: Optional[torch.Tensor] = None
        self._recalibration_due = True

        self.stages = None
        self.sampler = sampler
        if cfg.num_subnets > 0 or sampler is not None:
            self.stages = subnet_stages(model)
            if sampler is None:
                common = (cfg.input_scale, cfg.seed, cfg.input_size_multiple)
                if cfg.sampler == 'random':
                    self.sampler = RandomSubnetSampler(self.stages, cfg.min_keep_prob, *common)
                else:
                    max_drop = resolve_sample_space(cfg.sample_space, self.stages)
                    self.sampler = OrderedSubnetSampler(stage_depths(self.stages), max_drop, *common)
        self._sample_takes_height = self.sampler is not None and (
            'input_height' in inspect.signature(self.sampler.sample).parameters)
        if verbose:
            _logger.info(f'{type(self).__name__}: {cfg}')

    @property
    def model(self) -> nn.Module:
        """The bare model (no DDP, no compile wrapper; `compile()` compiles its blocks in place)."""
        return self._runner.module

    # --- step -------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._recalibration_due = True

    def before_validate(self, train_loader: Iterable, amp_autocast: Callable = nullcontext) -> int:
        """Re-estimate the BN statistics of the full network, and of its EMA copy when the task keeps one, on
        `recalibrate_bn` training images (the same images for both), once per epoch (reduced across ranks when
        distributed); returns the images used (0 when off or done)."""
        num_images = self.config.recalibrate_bn if self._recalibration_due else 0
        self._recalibration_due = False
        if num_images <= 0:
            return 0
        models = [self.model]
        ema = self.get_trainable_module(ema=True)
        if ema is not None:
            models.append(getattr(ema, 'module', ema))  # timm's ModelEma* keeps the copy in .module
        images = (batch[0] if isinstance(batch, (tuple, list)) else batch for batch in train_loader)
        seen = recalibrate_bn(models, images, num_images, autocast=amp_autocast)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            live_device = next(self.model.parameters()).device
            for model in models:  # an EMA kept on the CPU only (model_ema_force_cpu) is not reduced
                if next(model.parameters()).device == live_device:
                    distribute_bn(model, dist.get_world_size(), True)
        if self.verbose:
            which = 'the model and its EMA' if len(models) > 1 else 'the model'
            _logger.info(f'Re-estimated BatchNorm statistics of {which} on {seen} training images (epoch {self.epoch})')
        return seen

    def current_coef(self) -> float:
        return self.config.coef_at(self.epoch, self.num_epochs)

    def _subnets_this_step(self) -> int:
        """Sub-networks of the step about to run: none without gradients, at coef 0, and on steps whose index
        `train_steps` is not a multiple of `subnet_interval` (the same on every rank: each calls once a
        micro-batch)."""
        if self.sampler is None or not torch.is_grad_enabled() or self.current_coef() == 0 \
                or self.train_steps % self.config.subnet_interval:
            return 0
        return self.config.num_subnets

    def _run(self, x: torch.Tensor, subnet: bool, sync: bool) -> torch.Tensor:
        """Run the model; through DDP (whose backward reduces gradients) only when `sync`."""
        through_ddp = sync and isinstance(self.trainable_module, DistributedDataParallel)
        return (self.trainable_module if through_ddp else self._runner)(x, subnet=subnet)

    def _logits_for_loss(self, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return normalize_logits(logits, cfg.norm, cfg.amplitude) if cfg.subnet_loss.normalized_logits else logits

    def _subnet_loss(self, output: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.config.subnet_loss.fn(self._logits_for_loss(output), teacher, target, self.config.temperature)

    def _subnet_norm_context(self):
        return frozen_running_stats(self.model) if self.config.bn == 'freeze' else nullcontext()

    def _sample(self, input_height: int) -> SubnetPlan:
        return self.sampler.sample(input_height=input_height) if self._sample_takes_height else self.sampler.sample()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Full-network pass and loss; the sub-network passes run during the loop's backward.

        Returns `loss` (main loss; its backward adds the sub-network gradients) and `output`
        (the raw logits of the full network).
        """
        self.subnet_loss = None
        num_subnets = self._subnets_this_step()
        if torch.is_grad_enabled():
            self.train_steps += 1
        output = self._run(input, subnet=False, sync=num_subnets == 0)
        logits = self._logits_for_loss(output)
        loss = self.criterion(logits, target)
        if num_subnets == 0:
            return {'loss': loss, 'output': output}
        plans = [self._sample(input.shape[-2]) for _ in range(num_subnets)]
        n = self.config.subnet_batch_size(input.shape[0])  # images, teacher and targets sliced alike
        step = _SubnetStep(self, input[:n], target[:n], logits[:n].detach().float(), plans, self.current_coef())
        return {'loss': _RunSubnetsAfterBackward.apply(loss, step), 'output': output}

    # --- timm task contract -------------------------------------------------------------------

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the full network as one graph (`torch.compile(model)`: the main pass and the eval model,
        returned) and, with sub-networks, each block of the stages in place for the sub-network passes (regional
        compilation, `nn.Module.compile`, dynamic shapes: same modules, same state_dict keys; an EMA copy made
        afterwards is an eager copy). `use_subnet` narrows the stage containers, which run eagerly, so every
        sub-network runs the same compiled blocks; the package's sub-network evaluation and BatchNorm
        re-estimation run them eagerly. Every mode is accepted (`check_compile_mode` refuses unknown ones); the
        blocks get the same options without CUDA graphs. The bound on block graphs, dynamo's recompile limits
        raised to match per side drawn, and the modes: `timm_st.method.backends`. Other keyword arguments go to
        `torch.compile` for both.
        """
        check_compile_mode(backend, mode)
        cfg = self.config
        if backend == 'inductor' and self.stages is not None and cfg.input_scale is not None \
                and cfg.input_size_multiple == 1 and self.verbose:
            _logger.info('compile(): inductor compiles the sub-network blocks once per input side drawn; '
                         'stimulative.input_size_multiple (e.g. 8) bounds the number of sides')
        compiled = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        object.__setattr__(self._runner, 'main', compiled)
        self.eval_model = compiled
        if self.stages is not None:
            self._block_budget = BlockGraphBudget(self.stages)  # dynamo's limits, raised per side drawn
            block_mode, block_options = block_compile_options(backend, mode, compile_kwargs.get('options'))
            block_kwargs = {'dynamic': True, **compile_kwargs, 'options': block_options}
            for stage in self.stages:
                for block in stage.container._modules.values():
                    block.compile(backend=backend, mode=block_mode, **block_kwargs)
        return compiled

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'StimulativeTask':
        """Wrap the model in DDP. With sub-networks, `find_unused_parameters` is required (a
        sub-network skips blocks) and `static_graph` is not possible (the graph changes)."""
        if self.sampler is not None:
            if ddp_kwargs.get('find_unused_parameters') is False or ddp_kwargs.get('static_graph'):
                raise ValueError(
                    'StimulativeTask with sub-networks needs DDP(find_unused_parameters=True, static_graph=False): '
                    'sub-networks skip blocks, so the set of used parameters changes every pass')
            ddp_kwargs['find_unused_parameters'] = True
        if device_ids is not None and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None  # DDP takes no device_ids for CPU modules
        self.trainable_module = DistributedDataParallel(self._runner, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        if module is None and not ema and not hasattr(self, 'eval_model'):
            return self.model
        return super().get_eval_model(module=module, ema=ema)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The training steps taken and the sampler's generator state (so a resumed run runs sub-networks on
        the same steps and draws the same plans); empty without sub-networks."""
        if ema or self.sampler is None:
            return {}
        state = {'train_steps': self.train_steps}
        if hasattr(self.sampler, 'state_dict'):
            state['subnet_sampler'] = self.sampler.state_dict()
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if ema or self.sampler is None:
            return
        state = state or {}
        if 'train_steps' in state:
            self.train_steps = int(state['train_steps'])
        elif self.config.subnet_interval > 1 and self.verbose:
            _logger.warning('Checkpoint has no step count; subnet_interval counts steps from 0 again.')
        if not hasattr(self.sampler, 'load_state_dict'):
            return
        if 'subnet_sampler' in state:
            self.sampler.load_state_dict(state['subnet_sampler'])
        elif self.verbose:
            _logger.warning('Checkpoint has no sub-network sampler state; sampling starts from the configured seed.')
