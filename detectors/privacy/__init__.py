"""Membership-inference and model-inversion detectors."""
