"""The image mode by timm train.py's rule, and the one calibration rule (results.json = timm-st analyze)."""
import json

import pytest
import timm
import torch
from timm.data import resolve_data_config

from timm_st.commands.train import main
from timm_st.runs.data import data_config, image_mode
from timm_st.runs.recipe import parse_args
from timm_st.runs.runner import Runner

BASE = ['--model', 'resnet20_cifar', '--crop-pct', '1.0', '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0',
        '--lr', '0.05', '--workers', '0', '--device', 'cpu', '--no-prefetcher', '--log-interval', '100']


def timm_train_py_mode(args) -> str:
    """timm's train.py, written out: the model's channels from --in-chans / --input-size, the data config from
    timm's resolver, then `input_img_mode` or RGB for 3 data-config channels and L otherwise."""
    in_chans = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    model = timm.create_model(args.model, in_chans=in_chans, num_classes=3)
    config = resolve_data_config(vars(args), model=model)
    if args.input_img_mode is not None:
        return args.input_img_mode
    return 'RGB' if config['input_size'][0] == 3 else 'L'


@pytest.mark.parametrize('extra', [
    [], ['--input-size', '1', '16', '16'], ['--in-chans', '1', '--img-size', '16'], ['--in-chans', '3'],
    ['--input-size', '3', '16', '16', '--input-img-mode', 'L'], ['--img-size', '16', '--input-img-mode', 'RGBA'],
    ['--in-chans', '1'],  # timm's resolver then takes the model's default (3, 32, 32): RGB (refused by check_run)
])
def test_image_mode_is_timm_train_pys(extra):
    args, _ = parse_args(BASE + extra)
    model = timm.create_model(args.model, in_chans=args.in_chans or (args.input_size or [3])[0], num_classes=3)
    assert image_mode(args.input_img_mode, data_config(vars(args), model)) == timm_train_py_mode(args)


def test_one_channel_input_size_reads_grayscale_images(tmp_path, image_folder):
    """input_size: [1, H, W] without in_chans builds a 1-channel model: the images are read as L (an earlier
    rule read them as RGB and the first step failed with a channel mismatch)."""
    argv = BASE + ['--input-size', '1', '16', '16', '--mean', '0.5', '--std', '0.5', '--eval-subnets', '0',
                   '--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment', 'gray']
    args, config = parse_args(argv)
    runner = Runner(args, config, argv).check()
    assert runner.dataset_train.reader is not None and runner.dataset_train.input_img_mode == 'L'
    assert main(argv) == 0
    assert (tmp_path / 'gray' / 'results.json').is_file()


def test_in_chans_without_a_size_refused(tmp_path, image_folder, capsys):
    """--in-chans 1 alone: timm's data config keeps the model's 3-channel default and would feed RGB images."""
    assert main(BASE + ['--in-chans', '1', '--data-dir', str(image_folder), '--output', str(tmp_path / 'o')]) == 2
    assert 'in_chans 1' in capsys.readouterr().err and not (tmp_path / 'o').exists()


def test_results_json_recalibrated_subnets_equal_analyze_with_mixup(tmp_path, image_folder):
    """One calibration rule: results.json re-estimates each sub-network's BatchNorm statistics exactly as
    `timm-st analyze` does (training augmentation, no mixup, the same fixed images and seed), also when the
    recipe mixes batches (mixup would change the statistics)."""
    from timm_st.commands.analyze import main as analyze_main
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(json.dumps({'stimulative': {'num_subnets': 1, 'sample_space': {'max_drop': [2, 2, 2]}},
                                  'mixup': 1.0, 'mixup_prob': 1.0, 'smoothing': 0.0}))
    base = [a for a in BASE if a != '--no-prefetcher']  # the prefetcher's collate mixes the loader's batches
    argv = ['-c', str(recipe)] + base + ['--img-size', '16', '--epochs', '2', '--eval-subnets', '3',
                                         '--data-dir', str(image_folder), '--output', str(tmp_path), '--experiment',
                                         'run']
    assert main(argv) == 0
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())['subnets']
    assert analyze_main([str(tmp_path / 'run'), '--data-dir', str(image_folder), '--checkpoint', 'last',
                         '--subnets', '3', '--bn', 'both', '--workers', '0', '--output', str(tmp_path / 'a')]) == 0
    entries = json.loads((tmp_path / 'a' / 'analysis.json').read_text())['sources'][0]['subnets'][1:]
    ours = [e['recalibrate']['top1'] for e in results['subnets']]
    theirs = [e['recalibrate']['top1'] for e in entries]
    assert ours == theirs
    assert ours != [e['running']['top1'] for e in results['subnets']]  # re-estimation changed something
