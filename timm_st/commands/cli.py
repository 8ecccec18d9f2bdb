"""The `timm-st` command: `timm-st train ...` (`python -m timm_st train ...` under torchrun), `timm-st publish ...`,
`timm-st analyze ...`; each command is a parser and a `main` over the run layer (`timm_st.runs`)."""
import importlib
import sys
from typing import Optional, Sequence

from ..runs.errors import INTERRUPTED, RunError

__all__ = ['main', 'report']

_USAGE = """usage: timm-st COMMAND [options]

commands:
  train     train a timm model with a recipe (common or stimulative training)
  publish   put a trained checkpoint on the Hugging Face hub as a timm model (or --local-dir DIR)
  analyze   measure loafing: evaluate every sub-network of trained runs or timm models (BN modes, lesions, plots)

Run `timm-st COMMAND --help` for the options of a command."""


def report(command: str, error: RunError) -> int:
    """Print a refusal or a stop as one line on stderr (`timm-st CMD: error: ...`); returns its exit code."""
    kind = '' if error.exit_code >= INTERRUPTED else 'error: '  # stopped by a signal (128 + n): not an error
    print(f'timm-st {command}: {kind}{error}', file=sys.stderr, flush=True)
    return error.exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE)
        return 0 if argv else 2
    if argv[0] in ('train', 'publish', 'analyze'):  # imported when named: each command imports what it needs
        return importlib.import_module(f'.{argv[0]}', __package__).main(argv[1:])
    print(f'timm-st: unknown command {argv[0]!r}\n\n{_USAGE}', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
