"""The simulator, the demo, scoring against the truth, the embedded broker."""
