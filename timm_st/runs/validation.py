"""The one validation of a run, for every route, before any work.

`check_run` checks a whole run (recipe + command line) for `timm-st train` and for timm's `train.py`
through the hook: option ranges, device, data folder and splits, the model (on the meta device),
checkpoints, the stimulative task, optimizer and scheduler, option combinations, and what the installed
timm supports; `check_dataset_classes` needs the dataset itself, and the checks of `timm-st analyze` are
here too. Every refusal is a one-line `RunError` naming the key or path and the fix.
"""
import difflib
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from timm.utils.distributed import is_distributed_env

from ..method.backends import check_compile_mode
from ..method.config import StimulativeConfig
from .build import build_model, build_task, mixup_active
from .checkpoints import load_weights, read_checkpoint
from .data import DIGITS, class_names, create_split, data_config, is_remote
from .errors import RunError
from .folder import TIMM_ST_TRAIN
from .options import check_ranges, flag

__all__ = ['check_run', 'check_combinations', 'check_dataset_classes', 'check_output_folder']


def _fail(message: str) -> None:
    raise RunError(message)


def _check_device(device: Any) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        _fail(f"device {device!r} is not a device PyTorch knows; use 'cpu', 'cuda', 'cuda:N' or 'mps' "
              f'(recipe key device or --device)')
    if dev.type == 'cpu':
        return
    backend = getattr(torch, dev.type, None)
    available = torch.backends.mps.is_available if dev.type == 'mps' else getattr(backend, 'is_available', None)
    if available is None or not available():
        _fail(f'device {device!r}: no {dev.type} device is available on this machine; pass --device cpu '
              f'(or run where {dev.type} is available)')
    count = getattr(backend, 'device_count', None)
    if dev.index is not None and count is not None and dev.index >= count():
        _fail(f'device {device!r}: this machine has {count()} {dev.type} device(s) (0..{count() - 1}); '
              f'pass another --device')


def _split_folder(root: str, split: str) -> Optional[str]:
    """The folder timm's image-folder dataset reads for `split` (timm's own lookup, with its synonyms),
    or None where timm would fall back to `root` itself."""
    from timm.data.dataset_factory import _search_split
    found = _search_split(root, split)
    return None if os.path.normpath(found) == os.path.normpath(root) else found


def _has_image(folder: str) -> bool:
    from timm.data.readers.img_extensions import get_img_extensions
    extensions = get_img_extensions(as_set=True)
    return any(os.path.splitext(f)[1].lower() in extensions for _, _, files in os.walk(folder) for f in files)


def _data_dir(args) -> Optional[str]:
    return getattr(args, 'data_dir', None) or getattr(args, 'data', None)  # timm's train.py: positional `data`


def _check_data(args, runner: str) -> None:
    dataset = getattr(args, 'dataset', '') or ''
    if dataset == DIGITS:
        return
    data_dir = _data_dir(args)
    train_split, val_split = getattr(args, 'train_split', 'train'), getattr(args, 'val_split', 'validation')
    if not data_dir:
        _fail(f'no dataset given: pass --data-dir PATH (an image folder with {train_split}/ and {val_split}/ '
              f'splits)' + (', or use --dataset digits for the embedded demo' if runner == TIMM_ST_TRAIN else ''))
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        _fail(f'data directory {data_dir!r} is a file, not a folder; pass --data-dir with the folder that holds '
              f'{train_split}/ and {val_split}/')
    if is_remote(dataset):
        return
    if not os.path.isdir(data_dir):
        _fail(f'data directory {data_dir!r} does not exist; pass --data-dir with an image folder containing '
              f'{train_split}/ and {val_split}/')
    on_purpose = ('pass --eval-on-train to evaluate on the training images on purpose (labelled so)'
                  if runner == TIMM_ST_TRAIN else 'timm-st train has --eval-on-train to evaluate on the training '
                                                  'images on purpose (labelled so)')
    train_folder = _split_folder(data_dir, train_split)
    if train_folder is None:
        _fail(f'training split {train_split!r} not found in {data_dir!r} (no {train_split}/ folder or timm synonym); '
              f'timm would silently train on the whole folder. Pass --train-split with the folder\'s name')
    if not _has_image(train_folder):
        _fail(f'cannot read dataset at {data_dir!r}: training split folder {train_folder!r} holds no images; put '
              f'<class>/<image> files there')
    if getattr(args, 'eval_on_train', False):
        return
    val_folder = _split_folder(data_dir, val_split)
    if val_folder is None:
        _fail(f'validation split {val_split!r} not found in {data_dir!r} (no {val_split}/ folder or timm synonym '
              f'val/, validation/, eval/); timm would silently evaluate on the training images. Add a held-out '
              f'{val_split}/ folder, pass --val-split with its name, or {on_purpose}')
    if os.path.realpath(val_folder) == os.path.realpath(train_folder):
        _fail(f'training and validation splits are the same folder {train_folder!r}; pass a held-out --val-split, '
              f'or {on_purpose}')
    if not _has_image(val_folder):
        _fail(f'cannot read dataset at {data_dir!r}: validation split folder {val_folder!r} holds no images; put '
              f'<class>/<image> files there')


def _folder_classes(args) -> Optional[int]:
    """Classes of an image-folder dataset (its class subfolders), None when not an image folder."""
    dataset, data_dir = getattr(args, 'dataset', '') or '', _data_dir(args)
    if is_remote(dataset) or dataset == DIGITS or not data_dir or not os.path.isdir(data_dir):
        return None
    folder = _split_folder(data_dir, getattr(args, 'train_split', 'train'))
    return (sum(1 for e in os.scandir(folder) if e.is_dir()) or None) if folder else None


def _run_model(args, runner: str):
    """The run's model, built on the meta device (no memory, no weights): fails early on bad model options."""
    num_classes = getattr(args, 'num_classes', None)
    if num_classes is None and runner == TIMM_ST_TRAIN:  # timm-st train takes the dataset's class count
        num_classes = _folder_classes(args)
    try:
        with torch.device('meta'):
            return build_model(vars(args), num_classes=num_classes)
    except RunError as e:
        _fail(f'{e} (recipe keys model, model_kwargs, num_classes, in_chans)')


def _check_channels(args, model) -> None:
    """The images' channels (the data config's, by which timm picks the image mode) must be the model's."""
    channels = getattr(args, 'in_chans', None)
    if channels is None or getattr(args, 'input_size', None) or getattr(args, 'img_size', None):
        return
    size = data_config(vars(args), model)['input_size']
    if size[0] != channels:
        _fail(f'in_chans {channels}: without img_size or input_size the data config takes the model\'s default input '
              f'size {tuple(size)}, so timm would feed {size[0]}-channel images to a {channels}-channel model; set '
              f'img_size (or input_size: [{channels}, H, W])')


def _check_checkpoints(args, model) -> None:
    for key in ('resume', 'initial_checkpoint'):
        path = getattr(args, key, None)
        if not path or (key == 'resume' and path == 'auto'):
            continue
        if os.path.isdir(path):
            _fail(f'checkpoint {path!r} ({flag(key)}) is a folder; pass a checkpoint file in it, e.g. '
                  f'{os.path.join(path, "last.pth.tar")}')
        if not os.path.isfile(path):
            _fail(f'checkpoint {path!r} does not exist ({flag(key)}); check the path (checkpoints are in the run\'s '
                  f'output folder)')
        try:
            if key == 'resume' and not isinstance(read_checkpoint(path).get('state_dict'), dict):
                raise RunError(f'checkpoint {path!r} holds no model weights ("state_dict"); it is not a training '
                               f'checkpoint of timm')
            got = {k: tuple(v.shape) for k, v in load_weights(path).items()}
        except RunError as e:
            _fail(f'{flag(key)}: {e}; use another checkpoint (e.g. last.pth.tar of a run of this recipe)')
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        keys = {'missing': sorted(set(expected) - set(got)), 'unexpected': sorted(set(got) - set(expected))}
        shapes = [f'{k} is {list(got[k])} there, {list(expected[k])} here' for k in expected
                  if k in got and got[k] != expected[k]]
        if keys['missing'] or keys['unexpected'] or shapes:
            detail = '; '.join([f'{what} weights {ks[:3]}' + (' ...' if len(ks) > 3 else '')
                                for what, ks in keys.items() if ks] + shapes[:2])
            classes = getattr(model, 'num_classes', '?')
            _fail(f'checkpoint {path!r} ({flag(key)}) does not fit this run\'s model {args.model!r} with {classes} '
                  f'classes ({detail}); use a checkpoint of the same architecture and class count, or fix model / '
                  f'num_classes')


def _check_optimizer(args) -> None:
    from timm.optim import create_optimizer_v2, list_optimizers
    opt = getattr(args, 'opt', None)
    if opt is None:
        return
    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(2, 2))], opt=opt, lr=0.1)
    except Exception as e:
        close = difflib.get_close_matches(str(opt).lower().split('_')[-1], list_optimizers(), n=3)
        hint = f'did you mean {close}? ' if close else ''
        _fail(f'optimizer {opt!r} cannot be created by timm {timm.__version__} ({type(e).__name__}: '
              f'{str(e).splitlines()[0] if str(e) else ""}); {hint}timm.optim.list_optimizers() lists the names '
              f'(recipe key opt or --opt)')


_SCHEDULER_CANDIDATES = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant')


def _scheduler_builds(name: str) -> bool:
    """Whether this timm's create_scheduler_v2 builds a scheduler named `name` (1.0.27 returns None for
    an unknown name, newer versions raise)."""
    from timm.scheduler import create_scheduler_v2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        with warnings.catch_warnings():  # e.g. timm's deprecation notice of 'plateau'
            warnings.simplefilter('ignore')
            scheduler, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=10, updates_per_epoch=1)
    except (ValueError, KeyError, TypeError, AssertionError):
        return False
    return scheduler is not None


def _check_scheduler(args) -> None:
    sched = getattr(args, 'sched', None)
    if sched is None or sched == 'none' or _scheduler_builds(sched):
        return
    known = [n for n in _SCHEDULER_CANDIDATES if _scheduler_builds(n)]
    _fail(f'scheduler {sched!r} is not one timm {timm.__version__} builds ({known + ["none"]}); '
          f'fix recipe key sched or --sched')


def check_combinations(args, config: Optional[StimulativeConfig]) -> None:
    """Options that each are valid but do not work together (every route)."""
    channels = getattr(args, 'in_chans', None) or (getattr(args, 'input_size', None) or [3])[0]
    for name in ('mean', 'std'):
        value = getattr(args, name, None)
        if value is not None and len(value) not in (1, channels):
            _fail(f'{name}: got {len(value)} values {list(value)} for {channels} input channels; give one value per '
                  f'channel (or one for all) in the recipe or with {flag(name)}')
    sizes, batches = getattr(args, 'train_img_sizes', None), getattr(args, 'train_batch_sizes', None)
    if batches is not None and sizes is None:
        _fail('train_batch_sizes needs train_img_sizes (one batch size per training size)')
    if batches is not None and len(batches) != len(sizes):
        _fail(f'train_batch_sizes has {len(batches)} values but train_img_sizes {len(sizes)}; give one batch size '
              f'per training size')
    stop, epochs = getattr(args, 'stop_epoch', None), getattr(args, 'epochs', None)
    if stop is not None and epochs is not None and stop > epochs:
        _fail(f'stop_epoch {stop} is after the last epoch ({epochs}); choose 1..{epochs}')
    bad = [e for e in getattr(args, 'save_epochs', None) or () if epochs is not None and e > epochs]
    if bad:
        _fail(f'save_epochs {bad}: milestones are completed-epoch counts within 1..epochs ({epochs})')
    if config is None:
        return
    if getattr(args, 'kd_model_name', None) is not None:
        _fail('the recipe has a stimulative: section and kd_model_name is set; train.py would build a '
              'distillation task and ignore stimulative training. Remove one of them.')
    try:
        config.check_targets(soft_targets=mixup_active(args))
    except ValueError as e:
        _fail(str(e))
    if config.normalizes_main_logits and getattr(args, 'bce_loss', False):
        _fail(f'stimulative.loss: {config.loss!r} layer-normalises the logits the main criterion sees, and bce_loss '
              f'makes that criterion binary cross-entropy (normalised logits keep every sigmoid near 0.5), a '
              f'combination the method was never run with; use loss: kl with bce_loss, or remove bce_loss')


def _loader_takes_zero_workers() -> bool:
    """Whether timm's create_loader accepts num_workers=0 with its default persistent_workers=True
    (timm before 1.0.29 hands both to torch's DataLoader, which refuses them)."""
    from timm.data import create_loader
    one = torch.utils.data.TensorDataset(torch.zeros(1, 3, 4, 4), torch.zeros(1))
    try:
        create_loader(one, input_size=(3, 4, 4), batch_size=1, num_workers=0, use_prefetcher=False)
    except ValueError:
        return False
    return True


def check_output_folder(path: Optional[str], option: str) -> None:
    """Refuse an output folder that cannot be created: it, or a folder it would be created in, is a file."""
    if not path:
        return
    existing = next(p for p in [Path(path), *Path(path).absolute().parents] if p.exists())  # the root exists
    if not existing.is_dir():
        _fail(f'{option} {str(path)!r}: {str(existing)!r} is a file, not a folder; pass a folder to write into')


def _check_environment(args, runner: str) -> None:
    """Options the installed timm, or this launch, must support."""
    if getattr(args, 'aug_repeats', 0) and not is_distributed_env():
        _fail(f'aug_repeats {args.aug_repeats}: repeated augmentation needs a distributed run (torchrun); '
              f'for a single process override it with --aug-repeats 0')
    if getattr(args, 'train_img_sizes', None) is not None:
        from timm.data import create_loader
        if 'input_size_choices' not in inspect.signature(create_loader).parameters:
            _fail(f'train_img_sizes needs timm >= 1.0.29 (installed: {timm.__version__}); pip install -U timm, '
                  f'or remove the key')
    if getattr(args, 'save_epochs', None) and not hasattr(timm.utils.CheckpointSaver, 'save_milestone'):
        _fail(f'save_epochs needs timm >= 1.0.31 (milestone checkpoints; installed: {timm.__version__}); '
              f'pip install -U timm, or remove save_epochs')
    if getattr(args, 'torchcompile', None):
        try:
            check_compile_mode(args.torchcompile, getattr(args, 'torchcompile_mode', None))
        except ValueError as e:
            _fail(f'{e} (recipe key torchcompile_mode or --torchcompile-mode)')
    if runner != TIMM_ST_TRAIN and getattr(args, 'workers', 1) == 0 and not _loader_takes_zero_workers():
        _fail(f'workers: 0 stops timm {timm.__version__}\'s loader in train.py (persistent_workers needs workers > 0); '
              f'pass --workers 1 or more, or run the recipe with timm-st train')


def check_run(args, config: Optional[StimulativeConfig], runner: str) -> torch.nn.Module:
    """The one validation of a whole run (recipe + command line), before any work; raises RunError.

    `runner` is `TIMM_ST_TRAIN` or a description of timm's train.py (the hook); `args` is that runner's
    namespace (options it lacks are skipped). Returns the run's model on the meta device.
    """
    model_name = getattr(args, 'model', None)
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = timm.list_models(f'*{str(model_name).split(".")[0][:6]}*')[:8]
        _fail(f'unknown model {model_name!r}; similar timm models: {close}. '
              f'(timm-st registers resnet20/32/44/56/110_cifar.)')
    check_ranges(args)
    check_output_folder(getattr(args, 'output', None), '--output')
    _check_device(getattr(args, 'device', None))
    _check_data(args, runner)
    model = _run_model(args, runner)
    _check_channels(args, model)
    _check_checkpoints(args, model)
    if config is not None:  # the model has a sub-network adapter and the space fits it
        build_task(model, config, num_epochs=getattr(args, 'epochs', None), verbose=False)
    _check_optimizer(args)
    _check_scheduler(args)
    check_combinations(args, config)
    _check_environment(args, runner)
    return model


def check_dataset_classes(args, dataset) -> Optional[int]:
    """The dataset's class count, which a set num_classes must equal."""
    count = len(class_names(dataset) or ()) or None
    if args.num_classes is not None and count is not None and count != args.num_classes:
        _fail(f'num_classes is {args.num_classes} but the dataset has {count} classes; '
              f'fix num_classes in the recipe or --num-classes')
    return count


def check_analysis_options(args) -> None:
    """The options of `timm-st analyze` that need no file read: counts, `--subnets`, the output folder."""
    if args.calib_images < 1:
        _fail(f'--calib-images {args.calib_images}: give a positive number of training images')
    if args.max_samples is not None and args.max_samples < 1:
        _fail(f'--max-samples {args.max_samples}: give a positive number of images')
    if args.batch_size is not None and args.batch_size < 1:
        _fail(f'--batch-size {args.batch_size}: give a positive batch size')
    if args.subnets not in (None, 'all') and not (args.subnets.isdigit() and int(args.subnets) > 0):
        _fail(f'--subnets {args.subnets!r}: give "all" or a positive number of sub-networks')
    check_output_folder(args.output, '--output')


def check_calibration_split(name: str, root: Optional[str], split: str, train_split: str, eval_dataset,
                            class_map: str = '', shown: Optional[str] = None) -> int:
    """The number of training images BatchNorm statistics can be re-estimated on (`--bn recalibrate`); refuses a
    training split that is absent, or that holds other classes than the evaluated split `eval_dataset`."""
    from timm.data.dataset_factory import _search_split
    shown = shown or f'{name or "image folder"} at {root}'
    fix = 'fix --data-dir / --train-split, or use --bn running'
    if not name and root and os.path.isdir(root):
        # without that split subfolder timm reads the whole folder: the evaluation images themselves
        calib_root, eval_root = _search_split(root, train_split), _search_split(root, split)
        if os.path.samefile(calib_root, root) or os.path.samefile(calib_root, eval_root):
            _fail(f'--bn recalibrate needs training images: {shown} has no {train_split}/ folder (timm would read '
                  f'the evaluation images instead); {fix}')
    try:
        train = create_split(name, root, train_split, 'RGB', class_map=class_map, shown=shown)  # counted, not decoded
    except RunError as e:
        raise RunError(f'--bn recalibrate needs training images: {e}; or use --bn running') from None
    ours, theirs = class_names(train), class_names(eval_dataset)
    if ours is not None and theirs is not None and ours != theirs:
        _fail(f'--bn recalibrate needs training images: split {train_split!r} of {shown} has classes '
              f'{ours[:5]}{"..." if len(ours) > 5 else ""} but split {split!r} has {len(theirs)} others '
              f'(no {train_split}/ folder?); {fix}')
    return len(train)
