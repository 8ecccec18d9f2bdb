"""Models registered with timm by timm_st (importing this package registers them and their sub-network adapters)."""
from .cifar_resnet import CifarBasicBlock, CifarResNet

__all__ = ['CifarResNet', 'CifarBasicBlock']
