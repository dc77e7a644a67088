"""Tests of streams.worker."""
