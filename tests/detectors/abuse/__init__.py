"""Tests of detectors.abuse."""
