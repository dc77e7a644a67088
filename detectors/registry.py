"""Registry of detectors by ``<family>.<name>``; ``inferwatch run`` with no config runs them all.

>>> sorted(names())[:3]
['abuse.rate_spike', 'drift.features', 'drift.psi']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from detectors.base import Detector

_FACTORIES: dict[str, Callable[..., Detector]] = {}


def register(name: str) -> Callable[[type[Any]], type[Any]]:
    def wrap(cls: type[Any]) -> type[Any]:
        if name in _FACTORIES:
            raise ValueError(f"detector {name!r} registered twice")
        cls.name = name
        _FACTORIES[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    # Importing the modules registers them; one public detector per module.
    import detectors.detection_blind
    import detectors.drift
    import detectors.extraction
    import detectors.privacy_probing
    import detectors.psi
    import detectors.rate_spike
    import detectors.silent_source  # noqa: F401


def names() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def create(name: str, **params: Any) -> Detector:
    """A detector by registry name, with shipped defaults overridden by ``params``."""
    _load_builtin()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(sorted(_FACTORIES))
        raise KeyError(f"unknown detector {name!r}; registered: {known}") from None
    return factory(**params)


def create_all(config: dict[str, dict[str, Any]] | None = None) -> list[Detector]:
    """Every registered detector, with per-detector parameter overrides from ``config``; one
    whose parameters say ``enabled: False`` is left out."""
    config = config or {}
    unknown = set(config) - set(names())
    if unknown:
        raise KeyError(
            f"config names unknown detectors {sorted(unknown)}; registered: {', '.join(names())}"
        )
    out = []
    for n in names():
        params = dict(config.get(n, {}))
        if params.pop("enabled", True):
            out.append(create(n, **params))
    return out
