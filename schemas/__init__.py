"""inferwatch schemas."""
