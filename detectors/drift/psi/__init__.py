"""``drift.psi``: prediction PSI per model and channel."""

from detectors.drift.psi.detector import PSI

__all__ = ["PSI"]
