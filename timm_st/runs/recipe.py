"""Recipes: a YAML file of timm `train.py` option names plus a `stimulative:` section, read and checked.

`parse_args` turns a recipe and a command line into `timm-st train`'s arguments and the validated
stimulative config; `check_keys` and `check_values` serve the hook too (against timm train.py's own
parser): every key must be one the runner honours (an ignored key would make an unfair comparison), and
each value must fit its option (type, list length, choices; numeric strings, which YAML 1.1 reads for
`3e-4`, converted as the command line would). Every refusal is a one-line `RunError`.
"""
import argparse
import difflib
import os
from typing import Any, Collection, Dict, Mapping, Optional, Sequence, Tuple

import yaml

from ..method.config import StimulativeConfig
from .errors import RunError
from .folder import TIMM_ST_TRAIN
from .options import build_parser, flag, option_names

__all__ = ['TASK_FACTORY', 'TASK_FACTORIES', 'load_recipe', 'check_keys', 'check_values', 'check_task_keys',
           'stimulative_config', 'parse_args']

# the task factory a recipe names for timm's train.py with patches/ applied (timm-st train builds that task itself),
# and the same factory under the hook module's earlier home, which recipes and run folders may still name
TASK_FACTORY = 'timm_st.commands.hook:create_task'
TASK_FACTORIES = (TASK_FACTORY, 'timm_st.hook:create_task')
# options given as key=value pairs on the command line and as a mapping in a recipe
_MAPPING_KEYS = ('model_kwargs', 'opt_kwargs', 'task_kwargs')


def _kwargs_pairs(option: str, values: Sequence[str]) -> Dict[str, Any]:
    """`key=value ...` (values read as YAML) -> mapping, as timm's ParseKwargs."""
    out = {}
    for item in values:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise RunError(f'{flag(option)}: expected key=value, got {item!r}')
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RunError(f'{flag(option)}: value of {key!r} is not valid YAML: {value!r}') from None
    return out


def load_recipe(path: str) -> Dict[str, Any]:
    """Read a recipe file: a mapping of timm train.py argument names (and `stimulative:`)."""
    if os.path.isdir(path):
        raise RunError(f'recipe {path!r} is a folder; pass the path of a recipe YAML file (see recipes/)')
    if not os.path.isfile(path):
        raise RunError(f'recipe {path!r} does not exist; pass the path of a recipe YAML (see recipes/)')
    with open(path) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RunError(f'recipe {path!r} is not valid YAML: {e}') from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RunError(f'recipe {path!r} must be a mapping of option names to values, got {type(recipe).__name__}')
    return recipe


def check_keys(keys: Collection[str], known: Collection[str], runner: str,
               timm_st_train_keys: Collection[str] = ()) -> None:
    """Refuse recipe keys the runner will not honour; `timm_st_train_keys`: those `timm-st train` would."""
    unknown = sorted(k for k in keys if k not in known)
    if not unknown:
        return
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        if key in timm_st_train_keys:
            problems.append(f'{key!r} (an option of timm-st train that this runner lacks: upgrade timm\'s train.py '
                            f'to a version that has {flag(key)}, run the recipe with timm-st train, '
                            f'or remove the key)')
        elif close:
            problems.append(f'{key!r} (did you mean {close[0]!r}?)')
        else:
            problems.append(f'{key!r}')
    raise RunError(
        f'recipe key(s) {unknown} not supported by {runner}: {", ".join(problems)}. A silently ignored key would train '
        f'something else than the recipe says: fix the spelling (timm train.py option names with underscores, '
        f'e.g. weight_decay) or remove the key.')


def _convert(value: Any, to) -> Tuple[bool, Any]:
    """(ok, converted) for one element: numbers for numeric options (numeric strings converted), text for others."""
    if isinstance(value, bool):
        return False, value
    if to in (None, str):
        return isinstance(value, str), value
    if to in (int, float) and isinstance(value, int if to is int else (int, float)):
        return True, value
    if isinstance(value, str):
        try:
            return True, to(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return False, value
    return to not in (int, float), value


def _type_name(to) -> str:
    return {float: 'a number', int: 'an integer', None: 'a string', str: 'a string'}.get(to, 'a value')


def _check_value(name: str, value: Any, action: argparse.Action) -> Any:
    if value is None:
        return None
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise RunError(f'recipe key {name!r}: expected true or false, got {value!r}')
        return value
    if action.dest in _MAPPING_KEYS or type(action).__name__ == 'ParseKwargs':
        if not isinstance(value, dict):
            raise RunError(f'recipe key {name!r}: expected a mapping (e.g. {{key: value}}), got {value!r}')
        return value
    if action.nargs in ('+', '*') or isinstance(action.nargs, int):
        if isinstance(action.nargs, int) and not (isinstance(value, (list, tuple)) and len(value) == action.nargs):
            raise RunError(f'recipe key {name!r}: expected a list of {action.nargs} values, got {value!r}')
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if action.nargs == '+' and not items:
            raise RunError(f'recipe key {name!r}: expected a non-empty list, got {value!r}')
        converted = [_convert(v, action.type) for v in items]
        if not all(ok for ok, _ in converted):
            raise RunError(f'recipe key {name!r}: expected a list of {_type_name(action.type)}s, got {value!r}')
        value = [v for _, v in converted]
        bad = [v for v in value if action.choices is not None and v not in action.choices]
    else:
        ok, value = _convert(value, action.type)
        if not ok:
            raise RunError(f'recipe key {name!r}: expected {_type_name(action.type)}, got {value!r}')
        bad = [value] if action.choices is not None and value not in action.choices else []
    if bad:
        raise RunError(f'recipe key {name!r}: got {bad[0]!r}; allowed: {list(action.choices)}')
    return value


def check_values(recipe: Mapping[str, Any], parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Check recipe values against the parser's options (timm-st train's or train.py's) -> converted values.

    As timm's newest train.py config loader: numeric strings become numbers for numeric options,
    a scalar where a fixed-length list is expected and a value outside `choices` are refused.
    """
    actions = {a.dest: a for a in parser._actions}
    return {name: _check_value(name, value, actions[name]) for name, value in recipe.items() if name in actions}


def check_task_keys(recipe: Dict[str, Any]) -> None:
    """`task`/`task_kwargs` are for timm's patched train.py; here only the task they would build is allowed."""
    task = recipe.pop('task', TASK_FACTORY)
    if task not in TASK_FACTORIES:
        raise RunError(f'recipe key task: {task!r}; timm-st train builds its own task (allowed: {TASK_FACTORY!r})')
    task_kwargs = recipe.pop('task_kwargs', None)
    if task_kwargs:
        raise RunError(f'recipe key task_kwargs: {task_kwargs!r}; timm-st train takes ST settings from the '
                       f'stimulative: section (or --stimulative KEY=VALUE) only')


def stimulative_config(section: Any) -> Optional[StimulativeConfig]:
    """A recipe's `stimulative:` section (None: common training) -> validated config."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise RunError(f'recipe key stimulative: expected a mapping of stimulative-training settings, '
                       f'got {section!r}')
    try:
        return StimulativeConfig.from_dict(section)
    except ValueError as e:
        raise RunError(str(e)) from None


def _parse(parse, argv):
    """argparse exits on a bad command line; turn that into a RunError (its message is printed)."""
    try:
        return parse(argv)
    except SystemExit as e:
        if e.code:
            raise RunError('invalid command line (see the message above and `timm-st train --help`)') from None
        raise


def parse_args(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None
               ) -> Tuple[argparse.Namespace, Optional[StimulativeConfig]]:
    """Recipe + command line `argv` -> (args, stimulative config or None for common training).

    `parser`: `options.build_parser()` (the default) or one a command extended with options of its own.
    """
    argv, parser = list(argv), parser or build_parser()
    pre, _ = _parse(parser.parse_known_args, argv)
    recipe = load_recipe(pre.config) if pre.config else {}
    check_task_keys(recipe)
    section = recipe.pop('stimulative', None)
    check_keys(recipe, option_names(), TIMM_ST_TRAIN)
    if section is not None and not isinstance(section, dict):
        stimulative_config(section)  # refuses it
    parser.set_defaults(**check_values(recipe, parser))
    args = _parse(parser.parse_args, argv)
    for name in ('model_kwargs', 'opt_kwargs'):
        value = getattr(args, name)
        if isinstance(value, list):
            setattr(args, name, _kwargs_pairs(name, value))
    if args.stimulative is not None:  # command-line overrides of single keys
        section = {**(section or {}), **_kwargs_pairs('stimulative', args.stimulative)}
    config = stimulative_config(section)
    args.stimulative = section
    return args, config
