"""Drift detectors and their statistics."""
