"""inferwatch streams."""
