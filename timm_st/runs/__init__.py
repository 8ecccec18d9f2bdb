"""The run layer: everything a training run, an analysis or a publication is made of, one owner per concept.

`errors` (exit codes), `options` (the option table), `recipe` (recipe + command line -> arguments),
`validation` (of a run, every route), `checkpoints` (the one reader), `folder` (the run folder's format
and policy), `data` (datasets, data config, image mode, loaders), `build` (model, task, criterion,
precision), `digits` (the demo dataset), `loggers` (summary.csv, wandb, TensorBoard), `runner` (stages and
state), `hook` (ST inside timm's train.py), `publish` with `card` (a checkpoint as a timm model and card).
Nothing here parses `sys.argv`, prints to stdout or exits: `timm_st.commands` are a parser and a `main`.
"""
