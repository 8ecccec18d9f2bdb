"""`timm-st analyze`: how much a trained model's sub-networks loaf, for any timm model.

Every SOURCE (a run folder of `timm-st train` or of timm's `train.py`, a checkpoint file with
`--model`, a `local-dir:`/`hf-hub:` model, or a timm model name with `--pretrained`) is evaluated on
exactly the same sub-networks of one explicit space, with the model's running BatchNorm statistics
and/or statistics re-estimated per sub-network. Runs can be grouped (`--group NAME RUN...`, one
group per arm, one run per seed) so every statistic is reported as mean +- std over seeds.

A parser and a `main` over `timm_st.analysis` (`sources`, `study`, `measure`, `report`). Writes
`analysis.json`, `subnets.csv` and PNG plots to `--output`, and prints a short table. Every input is
checked before any evaluation: a bad one is a one-line error and exit status 2.
"""
import argparse
import shlex
import sys
from typing import Optional, Sequence

from ..analysis.evaluation import BN_MODES
from ..analysis.measure import analyze
from ..analysis.report import format_table
from ..analysis.study import ALL_SUBNETS_LIMIT
from ..method.sampling import list_sample_spaces
from ..runs.errors import RunError
from ..runs.loggers import setup_logging
from ..runs.options import CALIB_IMAGES
from .cli import report

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='timm-st analyze',
        description='Evaluate every sub-network of one or more models on the same space: accuracy against '
                    'FLOPs, BatchNorm modes, lesions, and several runs per arm as mean +- std over seeds.')
    p.add_argument('sources', nargs='*', metavar='SOURCE',
                   help='a run folder (timm-st train or timm train.py), a checkpoint file (with --model), '
                        'local-dir:PATH / hf-hub:ID, or a timm model name (with --pretrained)')
    p.add_argument('--group', nargs='+', action='append', default=[], metavar=('NAME', 'SOURCE'),
                   help='a named group of SOURCES (e.g. one run per seed of an arm); statistics are reported '
                        'as mean +- std over its members. Repeat for each arm: --group ct RUN... --group st RUN...')
    data = p.add_argument_group('data (defaults: the first run folder\'s)')
    data.add_argument('--data-dir', default=None, help='dataset root; optional for --dataset digits')
    data.add_argument('--dataset', default=None, help="timm dataset name ('' = image folder; 'digits' = the demo)")
    data.add_argument('--split', default=None, help='split to evaluate on (default: the run\'s val_split, else validation)')
    data.add_argument('--train-split', default=None, help='split whose images re-estimate BatchNorm (default: train)')
    data.add_argument('--batch-size', type=int, default=None, help='evaluation batch size (default: the run\'s, else 256)')
    data.add_argument('--workers', type=int, default=None, help='loader processes (default: the run\'s, else 4)')
    data.add_argument('--max-samples', type=int, default=None,
                      help='evaluate on a fixed random subset of N images (--seed), the same for every source')
    space = p.add_argument_group('sub-networks')
    space.add_argument('--space', default=None,
                       help=f'{"|".join(list_sample_spaces())} or a mapping such as \'{{"max_drop": [4, 4, 4]}}\' '
                            '(default: the first run\'s recipe space, else default)')
    space.add_argument('--subnets', default=None,
                       help=f'"all", or N distinct sub-networks (besides the full network) drawn with --seed (default: all when the space has at '
                            f'most {ALL_SUBNETS_LIMIT} members, else {ALL_SUBNETS_LIMIT})')
    space.add_argument('--bn', choices=BN_MODES + ('both',), default='running',
                       help='BatchNorm statistics of each sub-network: the model\'s running ones, re-estimated '
                            'for every sub-network on --calib-images training images, or both')
    space.add_argument('--calib-images', type=int, default=CALIB_IMAGES,
                       help='training images per re-estimation (a fixed random subset, under the run\'s training '
                            'augmentation, seeded)')
    space.add_argument('--lesion', action='store_true',
                       help='also remove blocks singly, k at random and swap neighbours (Veit et al. 2016)')
    space.add_argument('--seed', type=int, default=0, help='seed of drawn sub-networks, calibration images, lesions')
    model = p.add_argument_group('model')
    model.add_argument('--model', default=None, help='timm model name of checkpoint-file SOURCES')
    model.add_argument('--pretrained', action='store_true', help='timm model-name SOURCES load pretrained weights')
    model.add_argument('--checkpoint', choices=('best', 'last'), default='best',
                       help='which checkpoint of a run folder: model_best (default) or last')
    model.add_argument('--ema', action='store_true', help='use the EMA weights of run folders / checkpoints')
    run = p.add_argument_group('run')
    run.add_argument('--device', default=None, help='cuda, cpu, ... (default: cuda when available)')
    run.add_argument('--amp', action='store_true', help='evaluate under autocast')
    run.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), default='float16')
    run.add_argument('--channels-last', action='store_true')
    run.add_argument('--output', default=None, help='output folder (default: output/analyze/<time>)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        analysis, output_dir = analyze(args, 'timm-st analyze ' + shlex.join(argv))
    except RunError as e:
        return report('analyze', e)
    if analysis is not None:
        print(format_table(analysis), flush=True)
        print(f'Analysis: {output_dir / "analysis.json"}', flush=True)
    return 0
