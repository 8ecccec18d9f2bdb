"""Every bad `stimulative:` setting fails at task construction with a message naming key and value."""
import pytest
import timm
import torch

from timm_st import StimulativeConfig, StimulativeTask


@pytest.mark.parametrize('section,words', [
    ({'num_subnet': 1}, ["unknown key(s) ['num_subnet']", 'num_subnets']),
    ({'num_subnets': 1.5}, ['num_subnets', '1.5', 'integer >= 0']),
    ({'num_subnets': True}, ['num_subnets', 'True']),
    ({'num_subnets': -1}, ['num_subnets', '-1']),
    ({'num_subnets': '6'}, ['num_subnets', "'6'"]),
    ({'loss': 'kl-'}, ['loss', "'kl-'", 'kl_direction']),
    ({'loss': 'kl_direction', 'norm': 'batchnorm'}, ['norm', "'batchnorm'", 'layernorm']),
    ({'loss': 'kl_direction', 'amplitude': 0}, ['amplitude', '0', '> 0']),
    ({'temperature': -1.0}, ['temperature', '-1.0']),
    ({'temperature': float('nan')}, ['temperature', 'nan']),
    ({'coef': -0.5}, ['coef', '-0.5', '>= 0']),
    ({'coef': '1'}, ['coef', "'1'"]),
    ({'coef_schedule': 'cosine'}, ['coef_schedule', "'cosine'", 'cosine_up']),
    ({'start_epoch': -2}, ['start_epoch', '-2']),
    ({'sampler': 'uniform'}, ['sampler', "'uniform'", 'ordered']),
    ({'sampler': 'random', 'min_keep_prob': 0.0}, ['min_keep_prob', '0.0', '(0, 1]']),
    ({'sampler': 'random', 'min_keep_prob': 1.5}, ['min_keep_prob', '1.5']),
    ({'sample_space': {'max_drop': [1, 2], 'min_keep': [1, 1]}}, ['sample_space', 'max_drop']),
    ({'sample_space': {'max_keep': [1, 2]}}, ['sample_space', 'max_keep']),
    ({'sample_space': {'max_drop': [1, -1, 0, 0]}}, ['sample_space', '-1']),
    ({'sample_space': 3}, ['sample_space', '3']),
    ({'input_scale': [0.0, 1.0]}, ['input_scale', '[0.0, 1.0]', '0 < lo <= hi <= 1']),
    ({'input_scale': [0.5, 1.2]}, ['input_scale', '1.2']),
    ({'input_scale': [0.8, 0.5]}, ['input_scale', '[0.8, 0.5]']),
    ({'input_scale': 0.5}, ['input_scale', '0.5']),
    ({'bn': 'recompute'}, ['bn', "'recompute'", 'freeze']),
    ({'recalibrate_bn': -1}, ['recalibrate_bn', '-1']),
    ({'recalibrate_bn': 2000.0}, ['recalibrate_bn', '2000.0']),
    ({'seed': 'abc'}, ['seed', "'abc'"]),
    ({'norm': 'l2'}, ['norm', 'kl_direction']),
    ({'amplitude': 2.0}, ['amplitude', 'kl_direction']),
    ({'min_keep_prob': 0.5}, ['min_keep_prob', 'random']),
    ({'sampler': 'random', 'sample_space': 'space3'}, ['sample_space', 'ordered']),
])
def test_bad_config_names_key_and_value(section, words):
    with pytest.raises(ValueError) as info:
        StimulativeConfig.from_dict(section)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.fixture(scope='module')
def resnet18():
    return timm.create_model('resnet18', num_classes=3)


@pytest.mark.parametrize('section,kwargs,words', [
    ({'sample_space': 'space3'}, {}, ['sample_space', "'space3'", '[3, 4, 6, 3]', '[2, 2, 2, 2]']),
    ({'sample_space': {'min_keep': [1, 3, 1, 1]}}, {}, ['sample_space.min_keep', 'stage 1', '1..2']),
    ({'sample_space': {'max_drop': [1, 1, 2, 1]}}, {}, ['sample_space', 'stage 2', 'at most 1']),
    ({'sample_space': {'max_drop': [1, 1, 1]}}, {}, ['sample_space.max_drop', '3 entries', '4 stages']),
    ({'sample_space': 'nope'}, {}, ['sample_space', "'nope'", 'default']),
    ({'coef_schedule': 'cosine_down'}, {}, ['coef_schedule', 'num_epochs']),
])
def test_bad_config_for_model_fails_at_construction(resnet18, section, kwargs, words):
    with pytest.raises(ValueError) as info:
        StimulativeTask(resnet18, section, verbose=False, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_model_without_adapter_names_class_and_fix():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(ValueError) as info:
        StimulativeTask(model, {'num_subnets': 1}, verbose=False)
    message = str(info.value)
    for word in ('Sequential', 'ResNet', 'VisionTransformer', 'register_subnet_adapter'):
        assert word in message
    StimulativeTask(model, {'num_subnets': 0}, verbose=False)  # common training needs no adapter


def test_defaults_and_valid_spaces(resnet18):
    cfg = StimulativeConfig.from_dict(None)
    assert (cfg.num_subnets, cfg.loss, cfg.sampler, cfg.sample_space, cfg.bn, cfg.input_scale) == (
        1, 'kl', 'ordered', 'default', 'freeze', None)
    task = StimulativeTask(resnet18, {'sample_space': {'min_keep': [2, 1, 2, 1]}}, verbose=False)
    assert task.sampler.max_drop == (0, 1, 0, 1)
    resnet50 = timm.create_model('resnet50')
    assert StimulativeTask(resnet50, {'sample_space': 'space3'}, verbose=False).sampler.max_drop == (0, 1, 3, 0)
