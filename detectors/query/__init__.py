"""Per-query geometry shared by the query-pattern detectors: sketches and compiled kernels."""
