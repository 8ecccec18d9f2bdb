"""timm-st: stimulative training (ST, ST++) for timm models, as a timm `TrainingTask`."""
from . import models  # registers the CIFAR ResNets with timm
from .method.adapters import Stage, register_subnet_adapter, subnet_stages, use_subnet
from .method.batchnorm import frozen_running_stats, recalibrate_bn
from .method.config import StimulativeConfig
from .method.losses import (
    SubnetLoss, dkd_loss, kl_div_loss, mse_prob_loss, normalize_logits, register_subnet_loss, soft_ce_loss,
)
from .method.plan import SubnetPlan, resize_input
from .method.sampling import (
    OrderedSubnetSampler, RandomSubnetSampler, SubnetSampler, register_sample_space, resolve_sample_space,
)
from .method.task import StimulativeTask

__version__ = '0.1.0'

__all__ = [
    'StimulativeTask', 'StimulativeConfig', 'SubnetPlan',
    'Stage', 'register_subnet_adapter', 'subnet_stages', 'use_subnet',
    'SubnetSampler', 'OrderedSubnetSampler', 'RandomSubnetSampler', 'register_sample_space', 'resolve_sample_space',
    'SubnetLoss', 'register_subnet_loss', 'normalize_logits', 'kl_div_loss', 'soft_ce_loss', 'mse_prob_loss', 'dkd_loss',
    'resize_input', 'frozen_running_stats', 'recalibrate_bn',
]
