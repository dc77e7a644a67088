"""Tests of detectors.drift."""
