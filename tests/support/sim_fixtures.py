"""Simulated worlds shared by the query-pattern detectors' tests: the models of
``streams.sim.callers`` and their references, built the worker's way."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.models.reference import Reference
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from schemas.batch import EventBatch
from streams.sim.callers import START_MS, Traffic, World

MakeBatch = Callable[[dict[str, Any], World, int, int], EventBatch]


@functools.cache
def world() -> World:
    return World()


@functools.cache
def references(make_batch: MakeBatch) -> dict[tuple[str, str], Reference]:
    """From an hour of natural queries of 200 callers before the tests' streams."""
    w, rng, tr = world(), np.random.default_rng(99), Traffic()
    for m in range(3):
        ts = np.sort(START_MS - 3_600_000 + rng.integers(0, 3_600_000, 2_400))
        who = rng.integers(0, 200, ts.size)
        x = w.natural(m, rng, ts.size)
        for k in range(200):
            sel = who == k
            tr.add(ts[sel], f"warm{k}", ["10.0.0.1"], m, x[sel])
    cols = tr.merged()
    store, index = ReferenceStore(), FeatureIndex()
    for a in range(0, cols["ts"].size, 4_000):
        b = make_batch(cols, w, a, min(a + 4_000, cols["ts"].size))
        store.update(b, route(b, index))
    return store.frozen()


@functools.cache
def provisional(make_batch: MakeBatch) -> dict[tuple[str, str], Reference]:
    """What the reference store offers before a reference exists: the rows so far of 600
    natural queries per model from one caller (a reference freezes at 2,000)."""
    w, rng, tr = world(), np.random.default_rng(98), Traffic()
    for m in range(3):
        ts = np.sort(START_MS - 3_600_000 + rng.integers(0, 3_600_000, 600))
        tr.add(ts, "early", ["10.0.0.1"], m, w.natural(m, rng, ts.size))
    cols = tr.merged()
    store, index = ReferenceStore(), FeatureIndex()
    b = make_batch(cols, w, 0, cols["ts"].size)
    assert store.update(b, route(b, index)) == []
    return store.provisional()


def batches(tr: Traffic, make_batch: MakeBatch, size: int = 2_000) -> list[EventBatch]:
    cols = tr.merged()
    n = cols["ts"].size
    return [make_batch(cols, world(), a, min(a + size, n)) for a in range(0, n, size)]


def among_benign(model: int, x: npt.NDArray[np.float64], seed: int) -> tuple[Traffic, str]:
    """Queries ``x`` from one attacker key at 3/s, with 40 benign callers of the same model
    behind the same address around it; the traffic and the attacker's key."""
    w, rng, tr = world(), np.random.default_rng(seed), Traffic()
    for k in range(40):
        ts = np.sort(START_MS + rng.integers(0, 1_800_000, 30))
        tr.add(ts, f"key_benign{k:03d}", ["203.0.113.9"], model, w.natural(model, rng, 30))
    tr.add(START_MS + 60_000 + np.arange(len(x)) * 333, "key_attacker01", ["203.0.113.9"], model, x)
    return tr, "key_attacker01"
