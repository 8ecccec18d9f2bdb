"""Stimulative training inside timm's own, unmodified `train.py` (the no-patch route): the logic behind
`timm_st.commands.hook`, the module a recipe lists in timm's `device_modules` key::

    device_modules: [timm_st.commands.hook]
    stimulative: {num_subnets: 1, ...}

timm's `train.py` imports the `device_modules` at the start of `main()`, right after parsing the recipe (every
key, `stimulative` included, lands on `args`) and the command line. The import calls `activate()`, which finds
`main()`'s `args`, validates the whole run before any work (`validate_run`), and for a `stimulative:` section
puts a factory of `StimulativeTask` in place of train.py's `ClassificationTask` and wraps `train_one_epoch`
(`task.set_epoch`) and `validate` (`task.before_validate`, BatchNorm re-estimation on the training loader).

Recipes without `stimulative:` run exactly as plain timm; imported by anything but timm's `train.py`, the module
does nothing. A `train.py` without the structure relied on (`SUPPORTED`) stops with a message pointing to
`patches/`, whose `--task` option takes `create_task` here: `--task timm_st.commands.hook:create_task`.
"""
import argparse
import functools
import inspect
import logging
import os
import pkgutil
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

import timm_st  # noqa: F401  (registers timm-st's models with timm)
from timm.task import ClassificationTask

from ..method.config import StimulativeConfig, describe_method
from ..prefetch import guard_prefetcher
from .build import build_task
from .data import dataset_location
from .errors import RunError
from .folder import folder_mode, run_folder_path
from .options import option_names
from .recipe import TASK_FACTORIES, check_keys, check_values, load_recipe, stimulative_config
from .seeding import seeded_loader, set_loader_epoch
from .validation import check_combinations, check_run

__all__ = [
    'SUPPORTED', 'UnsupportedTrainScript', 'HookState',
    'create_task', 'install', 'activate', 'validate_run', 'check_train_script', 'is_timm_train_script',
    'find_main_args',
]

_logger = logging.getLogger(__name__)

SUPPORTED = ("timm's train.py of releases v1.0.23 to v1.0.28 and of the main branch up to commit "
             "aa4b5850c1543fa488abf260f18390eda46cf85d (v1.0.28-14-gaa4b5850)")
_PATCH_HINT = ("Use a supported train.py, run the recipe with `timm-st train`, or patch your train.py with "
               "timm-st's patches/apply.sh (patches/train_task_option.patch adds a generic --task option) and "
               "run it with --task timm_st.commands.hook:create_task")
FACTORY_PATH = TASK_FACTORIES[0]

# what the hook needs of train.py: leading parameters of the two functions it wraps (and ones it reads)
_TRAIN_ONE_EPOCH_PARAMS = ('epoch', 'model', 'loader', 'optimizer', 'args', 'task')
_VALIDATE_PARAMS = ('model', 'loader', 'loss_fn', 'args')
_VALIDATE_NEEDS = ('amp_autocast',)
# names main() must look up as globals, so that replacing them takes effect
_MAIN_GLOBALS = ('ClassificationTask', 'train_one_epoch', 'validate')
_ARGS_NEEDED = ('epochs',)


class UnsupportedTrainScript(RunError):
    """The running train.py lacks the structure the hook relies on."""


def _unsupported(problem: str) -> UnsupportedTrainScript:
    return UnsupportedTrainScript(f'timm_st.commands.hook: {problem}. The hook supports {SUPPORTED}. {_PATCH_HINT}.')


def _file(module: types.ModuleType) -> str:
    return getattr(module, '__file__', '?')


def _section(args: Any, task_kwargs: Optional[dict] = None) -> Optional[dict]:
    section = getattr(args, 'stimulative', None) if args is not None else None
    if task_kwargs:
        section = {**(section if isinstance(section, dict) else {}), **task_kwargs}
    return section


def create_task(
        model: nn.Module,
        criterion: Optional[Callable] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        args: Optional[argparse.Namespace] = None,
        **task_kwargs,
):
    """Task factory for timm's train.py with the `--task` option (patches/): `--task timm_st.commands.hook:create_task`.

    The stimulative task when the recipe has a `stimulative:` section or `--task-kwargs` are given (stimulative keys,
    e.g. `num_subnets=2`, overriding single keys of the section), timm's `ClassificationTask` otherwise.
    """
    section = _section(args, task_kwargs)
    config = stimulative_config(section) if section is not None else None
    if config is not None and args is not None:
        check_combinations(args, config)
    return build_task(model, config, criterion, device, dtype, verbose, getattr(args, 'epochs', None))


# --- recognising train.py and its structure -------------------------------------------------

def is_timm_train_script(module: Optional[types.ModuleType]) -> bool:
    """Whether `module` (normally `sys.modules['__main__']`) is a timm `train.py`: a script named
    train.py that uses timm (and is not one of timm-st's own modules)."""
    path = getattr(module, '__file__', None)
    if module is None or not isinstance(path, str) or os.path.basename(path) != 'train.py':
        return False
    spec = getattr(module, '__spec__', None)
    if spec is not None and (spec.name or '').split('.')[0] == 'timm_st':
        return False
    names = (v.__name__ if isinstance(v, types.ModuleType) else getattr(v, '__module__', None)
             for v in list(vars(module).values()))
    return any(isinstance(name, str) and name.split('.')[0] == 'timm' for name in names)


def _structure_problems(module: types.ModuleType) -> List[str]:
    problems = []
    cls = getattr(module, 'ClassificationTask', None)
    if not (isinstance(cls, type) and issubclass(cls, ClassificationTask)):
        problems.append(f"no global ClassificationTask from timm.task (found {cls!r})")
    for name, leading, needed in (('train_one_epoch', _TRAIN_ONE_EPOCH_PARAMS, ()),
                                  ('validate', _VALIDATE_PARAMS, _VALIDATE_NEEDS)):
        try:
            params = list(inspect.signature(getattr(module, name)).parameters)
        except (AttributeError, TypeError, ValueError):  # absent or not a function
            problems.append(f'no function {name}()')
            continue
        if tuple(params[:len(leading)]) != leading or any(p not in params for p in needed):
            problems.append(f'{name}({", ".join(params)}) does not start with ({", ".join(leading)})'
                            + (f' or lacks {", ".join(needed)}' if needed else ''))
    code = getattr(getattr(module, 'main', None), '__code__', None)
    missing = [n for n in _MAIN_GLOBALS if code is not None and n not in code.co_names]
    if code is None:
        problems.append('no function main()')
    elif missing:
        problems.append(f'main() does not use the global(s) {missing}')
    return problems


def check_train_script(module: types.ModuleType, args: Any = None) -> None:
    """Raise UnsupportedTrainScript when `module` lacks what the hook relies on (or `args` lacks options it reads)."""
    problems = _structure_problems(module)
    missing = [n for n in _ARGS_NEEDED if not hasattr(args, n)] if args is not None else []
    if missing:
        problems.append(f'its parsed args have no {missing}')
    if problems:
        raise _unsupported(f'{_file(module)} does not have the structure the hook relies on ({"; ".join(problems)})')


def _task_action(module: types.ModuleType) -> Optional[argparse.Action]:
    parser = getattr(module, 'parser', None)
    return parser._option_string_actions.get('--task') if isinstance(parser, argparse.ArgumentParser) else None


def _has_task_option(module: types.ModuleType) -> bool:
    """Whether train.py's `--task` takes a `module:factory` (patches/), i.e. has no fixed list of names as timm
    1.0.31's own `--task {classification,multilabel}` has."""
    action = _task_action(module)
    return action is not None and action.choices is None


def _resolve(path: str) -> Any:
    """The object a `module:attr` path names, None when there is none."""
    try:
        return pkgutil.resolve_name(path) if ':' in path else None
    except (ImportError, AttributeError, ValueError):
        return None


def find_main_args(module: types.ModuleType) -> argparse.Namespace:
    """The `args` local of `module.main()`, found among the frames that are importing this module."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_globals is vars(module) and frame.f_code.co_name == 'main':
                args = frame.f_locals.get('args')
                if isinstance(args, argparse.Namespace):
                    return args
            frame = frame.f_back
    finally:
        del frame
    raise _unsupported(f'imported by {_file(module)} but not from its main() with parsed `args` in scope (timm\'s '
                       f'train.py imports device_modules right after parsing them)')


# --- installation ---------------------------------------------------------------------------

@dataclass(eq=False)
class HookState:
    """What `install` put in place: the config, the task once built, the training loader last seen."""
    args: argparse.Namespace
    config: StimulativeConfig
    task: Optional[nn.Module] = None
    train_loader: Optional[Iterable] = None


def _recipe_path(main_module: types.ModuleType, args: Any) -> str:
    """The recipe train.py read: its `config_parser` takes `-c/--config` from the command line (sys.argv)."""
    if getattr(args, 'config', None):
        return args.config
    config_parser = getattr(main_module, 'config_parser', None)
    if not isinstance(config_parser, argparse.ArgumentParser):
        raise _unsupported(f'{_file(main_module)} has no global `config_parser` to find the recipe with')
    return getattr(config_parser.parse_known_args()[0], 'config', '') or ''


def _task_keys(main_module: types.ModuleType, args: Any, recipe: dict) -> set:
    """On a train.py whose --task takes no `module:factory`: the recipe's task keys the hook honours itself. A
    train.py with its own `--task NAME` (timm >= 1.0.31) keeps its names; naming our factory there selects its
    default task, which the hook replaces."""
    builtin = _task_action(main_module)
    task = getattr(args, 'task', None) or recipe.get('task') or FACTORY_PATH
    if recipe.get('task_kwargs'):
        raise RunError('recipe key task_kwargs needs a train.py whose --task takes module:factory (patches/); put '
                       'the settings in the stimulative: section')
    if task in TASK_FACTORIES:
        if builtin is not None:
            args.task = builtin.default
        return {'task', 'task_kwargs'}
    if builtin is None:
        raise RunError(f'recipe key task: {task!r}, but this train.py has no --task option (patches/ adds it); '
                       f'remove the key or name {FACTORY_PATH}')
    if task != builtin.default and _section(args) is not None:
        raise RunError(f'task {task!r} selects train.py\'s own {task!r} task, which stimulative training does not '
                       f'replace; remove the stimulative: section, or the task (or name {FACTORY_PATH})')
    return {'task_kwargs'}


def validate_run(main_module: types.ModuleType, args: argparse.Namespace
                 ) -> Tuple[Optional[dict], Optional[StimulativeConfig]]:
    """The validation `timm-st train` does, for the run this train.py is about to start -> (section, config).

    Every recipe key (the file of `-c/--config`) must be an option of this train.py's own `parser`, or one of
    timm-st's keys the hook honours (`stimulative`; `task`/`task_kwargs` naming this module's factory;
    `eval_subnets: 0`); then the values, `validation.check_run` and the run-folder policy (`folder_mode`, without
    overwrite). Sets on `args`: recipe values converted as timm's newest config loader does (numeric strings), and
    for `dataset: digits` the demo's image folder. Raises RunError.
    """
    runner = f"timm's train.py ({getattr(main_module, '__file__', 'train.py')})"
    parser = getattr(main_module, 'parser', None)
    if not isinstance(parser, argparse.ArgumentParser):
        raise _unsupported(f'{_file(main_module)} has no global argument parser `parser` to check the recipe against')
    path = _recipe_path(main_module, args)
    recipe = load_recipe(path) if path else {}
    ours = {'stimulative', 'eval_subnets'}
    if not _has_task_option(main_module):  # the recipe's line for a patched train.py; the hook does that work here
        ours |= _task_keys(main_module, args, recipe)
    if recipe.get('eval_subnets'):
        raise RunError(
            f'recipe key eval_subnets: {recipe["eval_subnets"]!r} is the end-of-run sub-network evaluation of '
            f'timm-st train, which {runner} does not do; remove the key and evaluate the run folder afterwards '
            f'with `timm-st analyze OUTPUT/EXPERIMENT --data-dir ...`, or run the recipe with timm-st train')
    known = {a.dest for a in parser._actions if a.dest != 'help'}
    check_keys([k for k in recipe if k not in ours], known, runner, timm_st_train_keys=option_names())
    for name, value in check_values(recipe, parser).items():
        if getattr(args, name, None) == recipe[name]:  # still the recipe's value (not overridden on the command line)
            setattr(args, name, value)
    if getattr(args, 'dataset', '') == 'digits':
        args.dataset, args.data_dir = dataset_location('digits', getattr(args, 'data_dir', None))
    task_path = getattr(args, 'task', None)
    selects_factory = bool(task_path) and _has_task_option(main_module) and _resolve(task_path) is create_task
    section = _section(args, getattr(args, 'task_kwargs', None) if selects_factory else None)
    config = stimulative_config(section)
    check_run(args, config, runner)
    folder = run_folder_path(getattr(args, 'output', ''), getattr(args, 'experiment', ''))
    if folder is not None:  # train.py writes into a folder whatever is there
        folder_mode(folder, getattr(args, 'resume', ''), runner=runner)
    return section, config


def _key_training_loader(ns: dict, args: argparse.Namespace) -> None:
    """train.py's training loader with the random draws of timm-st train (`runs.seeding`: keyed by seed, rank,
    epoch and batch), so that both routes draw the same batches, augmentations and step draws; both loaders with
    timm-st's prefetcher guard."""
    create_loader = ns.get('create_loader')
    if create_loader is None or getattr(create_loader, '_timm_st_keyed', False):
        return

    @functools.wraps(create_loader)
    def keyed_create_loader(*a, **kw):
        loader = guard_prefetcher(create_loader(*a, **kw))  # timm <= 1.0.28's prefetcher under DDP (prefetch.py)
        if not kw.get('is_training'):
            return loader
        return seeded_loader(loader, args.seed, getattr(args, 'rank', 0), args.mixup_off_epoch,
                             torch.device(kw.get('device', 'cuda')))

    keyed_create_loader._timm_st_keyed = True
    ns['create_loader'] = keyed_create_loader
def install(main_module: types.ModuleType, args: argparse.Namespace) -> Optional[HookState]:
    """Validate the run and put stimulative training in place in a timm train.py module namespace.

    Returns None (and changes nothing but `args`, see `validate_run`) when `args` has no
    `stimulative` section, or when the script has the generic `--task` option and `args.task`
    selects this module's factory. Raises RunError for a run that cannot start and
    UnsupportedTrainScript for a train.py without the structure the hook relies on.
    """
    existing = getattr(main_module.__dict__.get('ClassificationTask'), '_timm_st_state', None)
    if existing is not None:
        return existing
    task_path = getattr(args, 'task', None)
    patched = bool(task_path) and _has_task_option(main_module)
    if patched and _section(args) is not None and _resolve(task_path) is not create_task:
        raise RunError(f'the recipe has a stimulative: section but --task {task_path!r} selects another task; '
                          f'use --task {FACTORY_PATH} (or remove the stimulative: section)')
    if _section(args) is not None and not patched:
        check_train_script(main_module, args)
    section, config = validate_run(main_module, args)
    if section is None:
        return None  # plain timm
    ns = vars(main_module)
    _key_training_loader(ns, args)
    if patched:
        return None  # the patched train.py builds the task and calls its callbacks itself
    state = HookState(args, config)

    def task_factory(model, criterion=None, device=None, dtype=None, verbose=True):
        """Stands in for ClassificationTask in train.py: builds the stimulative task instead."""
        state.task = build_task(model, config, criterion, device, dtype, verbose, args.epochs)
        return state.task

    task_factory._timm_st_state = state

    original_train = ns['train_one_epoch']
    train_sig = inspect.signature(original_train)

    @functools.wraps(original_train)
    def train_one_epoch(*a, **kw):
        bound = train_sig.bind(*a, **kw).arguments
        task = bound.get('task')
        if hasattr(task, 'set_epoch'):
            task.set_epoch(bound['epoch'])
        set_loader_epoch(bound['loader'], bound['epoch'])  # train.py before 1.0.28 tells it only when distributed
        state.train_loader = bound['loader']
        return original_train(*a, **kw)

    original_validate = ns['validate']
    validate_sig = inspect.signature(original_validate)

    @functools.wraps(original_validate)
    def validate(*a, **kw):
        task = state.task
        if task is not None and state.train_loader is not None:
            bound = validate_sig.bind(*a, **kw)
            bound.apply_defaults()
            task.before_validate(state.train_loader, amp_autocast=bound.arguments['amp_autocast'])
        return original_validate(*a, **kw)

    ns['ClassificationTask'] = task_factory
    ns['train_one_epoch'] = train_one_epoch
    ns['validate'] = validate
    if os.environ.get('RANK', '0') == '0':
        _logger.info(f'timm_st.commands.hook: stimulative training in {getattr(main_module, "__file__", "train.py")} '
                     f'({describe_method(section)[1]}; num_subnets {config.num_subnets}, loss {config.loss}, '
                     f'recalibrate_bn {config.recalibrate_bn})')
    return state


def activate(main_module: Optional[types.ModuleType] = None) -> Optional[HookState]:
    """What importing `timm_st.commands.hook` does: validate the run and install into `__main__` when it is timm's
    train.py (None otherwise). Raises RunError for a run that cannot start."""
    main_module = sys.modules.get('__main__') if main_module is None else main_module
    if not is_timm_train_script(main_module):
        return None
    return install(main_module, find_main_args(main_module))
