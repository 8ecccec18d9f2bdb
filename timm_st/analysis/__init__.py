"""Measurement: accuracy of the full network and of its sub-networks ("loafing")."""
