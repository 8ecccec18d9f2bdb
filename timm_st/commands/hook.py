"""The hook for timm's own `train.py`: list this module in a recipe's `device_modules` (the no-patch route),
or name `timm_st.commands.hook:create_task` as the `--task` factory of a train.py with `patches/` applied.

Importing it inside timm's train.py validates the run and installs stimulative training
(`timm_st.runs.hook`); a refusal is one line on stderr and exit code 2, not a traceback. Imported
anywhere else, it does nothing.
"""
import sys
import types
from typing import Optional

from ..runs.errors import RunError
from ..runs.hook import (FACTORY_PATH, SUPPORTED, HookState, UnsupportedTrainScript, check_train_script,
                         create_task, find_main_args, install, is_timm_train_script, validate_run)
from ..runs.hook import activate as _activate

__all__ = ['activate', 'create_task', 'install', 'validate_run', 'check_train_script', 'is_timm_train_script',
           'find_main_args', 'HookState', 'UnsupportedTrainScript', 'SUPPORTED', 'FACTORY_PATH', 'STATE']


def activate(main_module: Optional[types.ModuleType] = None) -> Optional[HookState]:
    """Validate the run and install into `__main__` when it is timm's train.py; stop it with exit code 2 and one
    line on stderr when the run cannot start."""
    try:
        return _activate(main_module)
    except RunError as e:
        print(f'timm_st: error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


STATE = activate()
