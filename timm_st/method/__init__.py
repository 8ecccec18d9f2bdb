"""The method: stimulative training as a timm task, and what it is made of.

`task` (the ST/ST++ step), `config` (the validated `stimulative:` section), `adapters` (where a
model's stages and blocks are, running a sub-network), `plan` (which blocks a sub-network keeps,
its input size), `sampling` (spaces and samplers), `losses` (sub-network losses), `batchnorm`
(BatchNorm handling in sub-network passes, re-estimation).
"""
