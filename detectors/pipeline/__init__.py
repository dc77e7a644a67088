"""Detectors of the pipeline's own input: silent sources."""
