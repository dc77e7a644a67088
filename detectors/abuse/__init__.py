"""Key, rate and cost abuse detectors."""
