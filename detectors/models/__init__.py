"""Per-model views and references: routing, reference profiles, channels."""
