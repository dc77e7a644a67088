"""Tests of streams.store."""
