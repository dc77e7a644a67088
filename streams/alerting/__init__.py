"""Alerts after the detectors: lifecycle, analyst workflow, outbox, routes, the pipeline's own
health.
"""
