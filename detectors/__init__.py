"""inferwatch detectors."""
