"""``extraction.query_pattern``: model extraction and black-box evasion probing in one caller's
queries.
"""

from detectors.extraction.query_pattern.detector import QueryPattern

__all__ = ["QueryPattern"]
