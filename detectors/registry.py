"""Registry of detectors by ``<family>.<name>``; ``inferwatch run`` with no config runs them all.

The registry is a table of names and ``"module:Class"`` import strings, loaded by name when a
detector is first created: it imports no detector module itself, so detector modules never
import each other through it and ``names()`` costs no import.

>>> sorted(names())[:3]
['abuse.rate_spike', 'drift.features', 'drift.psi']
>>> type(create("drift.psi")).__name__
'PSI'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

from detectors.base import Detector

# registry name -> "module:Class"; one public detector per module
BUILTIN: dict[str, str] = {
    "abuse.rate_spike": "detectors.abuse.rate_spike:RateSpike",
    "pipeline.detection_blind": "detectors.pipeline.detection_blind:DetectionBlind",
    "drift.features": "detectors.drift.features:FeatureDrift",
    "drift.psi": "detectors.drift.psi:PSI",
    "extraction.query_pattern": "detectors.extraction.query_pattern:QueryPattern",
    "pipeline.silent_source": "detectors.pipeline.silent_source:SilentSource",
    "privacy.query_probing": "detectors.privacy.query_probing:QueryProbing",
}

_CLASSES: dict[str, type[Any]] = {}


def register(name: str) -> Callable[[type[Any]], type[Any]]:
    """Give a detector class its registry name (the name must be in :data:`BUILTIN`, which
    alone decides what is registered). Prefer a ``name`` class attribute."""

    def wrap(cls: type[Any]) -> type[Any]:
        if name not in BUILTIN:
            raise ValueError(f"detector {name!r} is not in detectors.registry.BUILTIN")
        cls.name = name
        return cls

    return wrap


def load(name: str) -> type[Any]:
    """The class registered as ``name``, imported on first use."""
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    try:
        target = BUILTIN[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN))
        raise KeyError(f"unknown detector {name!r}; registered: {known}") from None
    module, _, attr = target.partition(":")
    cls = cast(type[Any], getattr(importlib.import_module(module), attr))
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{target} is registered as {name!r} but names itself {cls.name!r}")
    _CLASSES[name] = cls
    return cls


def names() -> list[str]:
    return sorted(BUILTIN)


def create(name: str, **params: Any) -> Detector:
    """A detector by registry name, with shipped defaults overridden by ``params``."""
    factory: Callable[..., Detector] = load(name)
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
