"""Model extraction and evasion probing detectors."""
