"""Commands and runners: the `timm-st` CLI, recipe parsing and validation, the run folder,
`timm-st train`, the hook for timm's own `train.py`, and `timm-st publish`."""
