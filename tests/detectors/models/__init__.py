"""Tests of detectors.models."""
