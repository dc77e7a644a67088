"""Tests of detectors.query."""
