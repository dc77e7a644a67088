"""Tests of detectors.pipeline."""
