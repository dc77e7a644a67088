"""The worker: its loop, the per-batch pipeline, checkpoints, buffers, settings and fault
injection.
"""
