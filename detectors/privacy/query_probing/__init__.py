"""``privacy.query_probing``: membership-inference and model-inversion probing in one api key's
queries.
"""

from detectors.privacy.query_probing.detector import QueryProbing

__all__ = ["QueryProbing"]
