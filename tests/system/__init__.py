"""Tests that run real worker processes, brokers and crashes."""
