"""Keyed state shared by the detectors: key slots and per-key segment reductions."""
