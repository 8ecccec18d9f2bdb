"""The run layer: everything a training run, an analysis or a publication is made of, one owner per concept.

`errors` (one exception class carrying its exit code), `options` (the one option table: parser, ranges,
scopes, loader arguments), `recipe` (recipe files and the command line -> arguments), `validation` (the
one validation of a run, every route), `checkpoints` (the one checkpoint reader, on timm's
`load_state_dict`), `folder` (the run folder's format and policy: fresh, resume in place, overwrite),
`data` (datasets, data config, image mode, loaders, the calibration rule), `build` (model, task,
criterion, device, precision), `digits` (the embedded demo dataset), `loggers` (summary.csv, wandb,
TensorBoard behind one interface), `runner` (the training runner: a class with stages and a state
dataclass), `hook` (stimulative training inside timm's own train.py), `publish` (a run's checkpoint as a
timm model folder or hub repository) with `card` (its model card).

Nothing here parses `sys.argv`, prints to stdout (only `logging`) or exits: the commands in
`timm_st.commands` are a parser and a `main` over this layer.
"""
