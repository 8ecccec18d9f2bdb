"""`timm-st train`: train a timm model with a recipe (common or stimulative training).

A parser (`timm_st.runs.options`, with `--check`) and a `main` over `timm_st.runs.runner.Runner`.
Exit codes: 0 done (or `--check` passed), 2 input refused before any work, 1 training stopped
(non-finite loss), 130 Ctrl-C, 143 / 138 stopped by SIGTERM / SIGUSR1 with a recovery checkpoint.
"""
import argparse
import sys
from typing import Optional, Sequence

from ..runs.errors import INTERRUPTED, RunError
from ..runs.loggers import setup_logging
from ..runs.options import build_parser as build_options_parser
from ..runs.recipe import parse_args
from ..runs.runner import Runner
from .cli import report

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    parser = build_options_parser()
    parser.add_argument('--check', action='store_true',
                        help='validate the run exactly as training would (recipe, options, data, checkpoints, run '
                             'folder) and exit without training or writing anything: exit code 0 or 2')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        args, config = parse_args(argv, build_parser())
        check = vars(args).pop('check')
        runner = Runner(args, config, argv)
        if check:
            runner.check()
            print(f'timm-st train --check: the run is valid ({"stimulative" if config else "common"} training of '
                  f'{args.model}, {len(runner.dataset_train)} training images); nothing was trained or written')
            return 0
        outcome = runner.run()
    except RunError as e:
        return report('train', e)
    except KeyboardInterrupt:
        print('timm-st train: interrupted before training started; nothing was trained', file=sys.stderr)
        return INTERRUPTED
    if outcome.message:
        print(outcome.message, flush=True)
    return 0
