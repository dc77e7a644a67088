"""Tests of detectors."""
