"""Tests of detectors.extraction."""
