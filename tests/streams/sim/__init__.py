"""Tests of streams.sim."""
