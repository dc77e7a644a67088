"""``abuse.rate_spike``: a caller's request rate far above its own history or its population."""

from detectors.abuse.rate_spike.detector import RateSpike

__all__ = ["RateSpike"]
