"""``drift.features``: windowed drift of features, predictions and confidence per model version."""

from detectors.drift.features.detector import FeatureDrift

__all__ = ["FeatureDrift"]
