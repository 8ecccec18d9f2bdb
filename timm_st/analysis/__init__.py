"""Measurement: accuracy of the full network and of its sub-networks ("loafing").

`evaluation` (the full network and every sub-network of a space, BatchNorm modes), `tree` (prefix-tree
evaluation), `lesions` (Veit et al.'s lesion study), and what `timm-st analyze` is made of: `sources`
(SOURCES to models with the one preprocessing rule), `study` (everything checked and built before
evaluation), `measure` (every source evaluated, split over torchrun ranks, with progress), `report`
(analysis.json, subnets.csv, `plots`, the table).
"""
