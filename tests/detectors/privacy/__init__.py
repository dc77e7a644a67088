"""Tests of detectors.privacy."""
