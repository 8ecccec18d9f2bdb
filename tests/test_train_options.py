"""`timm-st train --torchcompile`, `--amp` and `--channels-last` through the command line (`timm_st.commands.cli`):
each is seen in effect inside the training steps, sub-network passes included, not only accepted."""
import pytest
import timm
import torch
import yaml

from timm_st.commands.cli import main

COUNTING = 'timm_st_test_counting'


class _Counting:
    """A dynamo backend that runs the captured graph as it is and counts graphs compiled and calls of compiled code."""

    def __init__(self):
        self.graphs = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)
        return run


BACKEND = _Counting()
if COUNTING not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(compiler_fn=BACKEND, name=COUNTING)


def train(tmp_path, image_folder, *extra, stimulative=None):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(yaml.safe_dump({'stimulative': stimulative or {'num_subnets': 2, 'input_scale': [0.5, 1.0]}}))
    args = ['train', '-c', recipe, '--data-dir', image_folder, '--output', tmp_path, '--experiment', 'run',
            '--model', 'resnet20_cifar', '--img-size', '16', '--crop-pct', '1.0', '--batch-size', '8', '--epochs', '1',
            '--warmup-epochs', '0', '--workers', '0', '--device', 'cpu', '--no-prefetcher', '--eval-subnets', '2',
            *extra]
    return main([str(a) for a in args])


def test_torchcompile_runs_compiled_code_with_an_ema(tmp_path, image_folder):
    """`--torchcompile BACKEND` with an EMA (compiled by compile_ema) on ST++: the training steps ran compiled
    code (the whole-model graph and the blocks of the sub-networks), and the checkpoints keep plain state_dict
    keys for model and EMA."""
    torch._dynamo.reset()
    BACKEND.graphs = BACKEND.calls = 0
    assert train(tmp_path, image_folder, '--torchcompile', COUNTING, '--model-ema', '--model-ema-decay', '0.5') == 0
    steps = 3  # 24 training images, batch 8
    assert BACKEND.graphs >= 2 and BACKEND.calls >= steps * (1 + 2 * 3), (BACKEND.graphs, BACKEND.calls)
    checkpoint = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)
    keys = timm.create_model('resnet20_cifar', num_classes=3).state_dict().keys()
    assert checkpoint['state_dict'].keys() == keys and checkpoint['state_dict_ema'].keys() == keys


def channels_last_of(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.fixture
def training_convs():
    """What every convolution run in train mode saw: (autocast on, autocast dtype, output dtype, input and weight
    in channels-last), recorded by a global forward hook (training steps: the full pass and the sub-network
    passes; evaluation runs convolutions in eval mode)."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            x, w = args[0], module.weight
            seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'), output.dtype,
                         channels_last_of(x),
                         # a 1x1 kernel is laid out alike in both formats
                         w.is_contiguous(memory_format=torch.channels_last) if w.shape[-1] > 1 else channels_last_of(x)))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


def _subnet_pass_convs(seen):
    return len(seen) - 3 * 22  # 3 full passes of resnet20_cifar's 22 convolutions (stem, 18 in blocks, 2 shortcuts)


@pytest.mark.parametrize('amp', [True, False], ids=['amp-bf16', 'fp32-control'])
def test_amp_bfloat16_is_used_in_every_training_convolution(tmp_path, image_folder, training_convs, amp):
    extra = ['--amp', '--amp-dtype', 'bfloat16'] if amp else []
    assert train(tmp_path, image_folder, *extra) == 0
    assert _subnet_pass_convs(training_convs) > 0
    expected = (True, torch.bfloat16, torch.bfloat16) if amp else (False, torch.float32)
    assert {s[:len(expected)] if amp else (s[0], s[2]) for s in training_convs} == {expected}


@pytest.mark.parametrize('channels_last', [True, False], ids=['channels-last', 'nchw-control'])
def test_channels_last_reaches_every_training_convolution(tmp_path, image_folder, training_convs, channels_last):
    assert train(tmp_path, image_folder, *(['--channels-last'] if channels_last else [])) == 0
    assert _subnet_pass_convs(training_convs) > 0
    assert {s[3:] for s in training_convs} == {(channels_last, channels_last)}
