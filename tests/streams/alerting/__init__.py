"""Tests of streams.alerting."""
