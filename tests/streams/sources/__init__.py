"""Tests of streams.sources."""
