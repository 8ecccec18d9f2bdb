"""`timm-st publish`: a trained checkpoint as an ordinary timm model on the Hugging Face hub.

    timm-st publish OUTPUT_DIR --repo-id org/name [--ema] [--checkpoint best|last] [--private] [--overwrite]
    timm-st publish OUTPUT_DIR --local-dir ./export       # offline: write exactly what would be pushed

A parser and a `main` over `timm_st.runs.publish` (the export: model.safetensors, config.json, the
model card and recipe.yaml; the push). Exit codes: 0 published, 2 input refused (nothing written or
pushed), 1 the hub failed.
"""
import argparse
from typing import Optional, Sequence

from ..runs.errors import RunError
from ..runs.loggers import setup_logging
from ..runs.publish import export_checkpoint, publish
from .cli import report

__all__ = ['main', 'build_parser', 'export_checkpoint', 'publish']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-st publish',
        description='Publish a `timm-st train` checkpoint on the Hugging Face hub as an ordinary timm model '
                    '(model.safetensors, config.json, a model card and the recipe), or write it to a local folder.')
    parser.add_argument('output_dir', metavar='OUTPUT_DIR', help='output folder of a `timm-st train` run')
    parser.add_argument('--repo-id', default=None, metavar='ORG/NAME', help='hub repository to create and push to')
    parser.add_argument('--local-dir', default=None, metavar='DIR',
                        help='write what would be pushed into DIR instead (offline; with --repo-id, the card names '
                             'that repository)')
    parser.add_argument('--checkpoint', default='best', metavar='best|last|FILE',
                        help='model_best.pth.tar (default), last.pth.tar, or a checkpoint file of the run')
    parser.add_argument('--ema', action='store_true', help='publish the EMA weights (the run needs --model-ema)')
    parser.add_argument('--private', action='store_true', help='create the hub repository as private')
    parser.add_argument('--overwrite', action='store_true',
                        help='upload into an existing hub repository / replace a non-empty --local-dir')
    parser.add_argument('--revision', default=None, help='hub branch to push to (created if needed)')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--license', default='apache-2.0', help='license of the weights (default apache-2.0)')
    parser.add_argument('--dataset-id', default=None,
                        help='Hugging Face dataset id for the card metadata (guessed for CIFAR and ImageNet)')
    parser.add_argument('--model-name', default=None, help='title of the model card (default: from --repo-id)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error
        return e.code if isinstance(e.code, int) else 2
    setup_logging()
    common = dict(ema=args.ema, checkpoint=args.checkpoint, overwrite=args.overwrite, license=args.license,
                  dataset_id=args.dataset_id, model_name=args.model_name)
    try:
        if args.local_dir:
            path = export_checkpoint(args.output_dir, args.local_dir, repo_id=args.repo_id, **common)
            print(f'Wrote {", ".join(sorted(p.name for p in path.iterdir()))} to {path}\n'
                  f"Load it with timm.create_model('local-dir:{path}', pretrained=True)", flush=True)
        elif args.repo_id:
            url = publish(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, **common)
            print(f'Published {url}\n'
                  f"Load it with timm.create_model('hf-hub:{args.repo_id}', pretrained=True)", flush=True)
        else:
            raise RunError('give --repo-id ORG/NAME to push, or --local-dir DIR to write locally')
    except RunError as e:
        return report('publish', e)
    return 0
