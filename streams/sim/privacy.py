"""Membership-inference and model-inversion probing on the models of :mod:`streams.sim.callers`,
written from the published descriptions; every attack queries the model's answers as it goes.

- ``shadow`` (Shokri et al. 2017, as the issue describes the probing side): the attacker holds
  50 candidate records from the training distribution and asks the target about each one and
  10-20 small perturbations of it (Gaussian noise of 1-2% of each feature's spread: twice
  its interquartile range, the range for embedding coordinates, none on flags and counts),
  reading the full score vector; each record is asked again, unperturbed, once or twice among its
  perturbations (re-querying with and without noise).
- ``label_only`` (Choquette-Choo et al. 2021, the noise-robustness attack): the same 50 records,
  each with 10-20 perturbations of growing magnitude (0.5% to 3% of the spread) on a model that
  answers labels only: how much noise flips the label tells how far the record is from the
  decision boundary, and training members sit farther.
- ``confidence`` (Yeom et al. 2018 / Salem et al. 2019 threshold attacks with augmentations, as
  in Choquette-Choo et al. 2021 and Carlini et al. 2022): 200-500 candidate records, each asked
  with 1-5 small augmentations (noise of 1% of the spread), reading full score vectors.
- ``inversion_noise`` / ``inversion_seed`` (Fredrikson et al. 2015, black box): from a random
  input (noise over the feature ranges) or from a natural seed record, climb one target class's
  confidence by hill-climbing: propose the current best plus Gaussian noise of 1.5% of the spread
  (halved after 50 failures in a row), keep a proposal that raises the target's score; 1,000-
  3,000 queries. On a label-only model (no confidence to climb) the same budget walks away from
  the decision boundary as BREP-MI does (Kahla et al. 2022): from a point of the target class,
  eight probes on a small sphere, a step against the probes that left the class, the radius
  growing while every probe stays inside.

Every instance comes ``fast`` (2-5 queries/s inside the key's ordinary day of 20-80 benign
queries) or ``slow`` (spread over 24 h, one benign query of the same key per attack query).
Attacker keys, addresses and user agents are drawn by the same code as benign callers'. Model 1
(``limit-linear``) answers labels only in this evaluation (:func:`label_only_batch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.batch import EventBatch
from streams.sim.attacks import Instance
from streams.sim.callers import DAY_MS, START_MS, Traffic, World, caller_ips, new_key, to_batch

F64 = npt.NDArray[np.float64]
KINDS = ("shadow", "label_only", "confidence", "inversion_noise", "inversion_seed")
LABEL_ONLY_MODEL = 1
_MASKS: dict[tuple[int, int], F64] = {}
# ATLAS technique each kind should be reported under
ATLAS = {
    "shadow": "AML.T0024.000",
    "label_only": "AML.T0024.000",
    "confidence": "AML.T0024.000",
    "inversion_noise": "AML.T0024.001",
    "inversion_seed": "AML.T0024.001",
}


def _continuous(world: World, m: int) -> F64:
    """The noise scale of each feature an attacker nudges: its interquartile range (heavy-tailed
    amounts would jump by orders of magnitude with a share of their full range), the range for
    embedding coordinates, 0 for flags and counts."""
    x = world.natural(m, np.random.default_rng([5, m]), 2_000)
    mask = np.array([np.unique(c).size > 50 for c in x.T], np.float64)
    q25, q75 = np.quantile(x, [0.25, 0.75], axis=0)
    spread = world.hi[m] - world.lo[m] if m == 2 else 2.0 * (q75 - q25)
    out: F64 = mask * spread
    return out


def _noise(world: World, m: int, rng: np.random.Generator, x: F64, frac: F64 | float) -> F64:
    mask = _MASKS.setdefault((id(world), m), _continuous(world, m))
    scale = mask * np.asarray(frac, np.float64).reshape(-1, 1)
    out = x + rng.standard_normal(x.shape) * scale
    if m == 2:  # embeddings stay unit vectors
        out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.asarray(out, np.float64)


def shadow_queries(world: World, m: int, rng: np.random.Generator, label_only: bool) -> F64:
    recs = world.natural(m, rng, 50)
    out: list[F64] = []
    for r in recs:
        k = int(rng.integers(10, 21))
        frac = np.linspace(0.005, 0.03, k) if label_only else rng.uniform(0.01, 0.02, k)
        perts = _noise(world, m, rng, np.repeat(r[None], k, axis=0), frac)
        again = rng.integers(1, k, int(rng.integers(1, 3)))  # re-asked among its perturbations
        rows = [r[None], *np.split(perts, np.sort(again))]
        seq: list[F64] = [rows[0]]
        for part in rows[1:-1]:
            seq += [part, r[None]]
        seq.append(rows[-1])
        out.append(np.concatenate(seq))
    return np.concatenate(out)


def confidence_queries(world: World, m: int, rng: np.random.Generator) -> F64:
    recs = world.natural(m, rng, int(rng.integers(200, 501)))
    out: list[F64] = []
    for r in recs:
        k = int(rng.integers(1, 6))
        out += [r[None], _noise(world, m, rng, np.repeat(r[None], k, axis=0), 0.01)]
    return np.concatenate(out)


def inversion_queries(
    world: World, m: int, rng: np.random.Generator, n: int, from_seed: bool
) -> F64:
    lo, hi = world.lo[m], world.hi[m]
    classes = world.answer(m, world.natural(m, rng, 1)).shape[1]
    target = int(rng.integers(0, classes)) if m == 2 else 1
    if from_seed:
        x = world.natural(m, rng, 1)[0]
    else:
        x = lo + (hi - lo) * rng.random(lo.size)
        if m == 2:
            x = x / np.linalg.norm(x)
    if m == LABEL_ONLY_MODEL:
        return _brep_walk(world, m, rng, n, x, target)
    out = [x]
    best = float(world.answer(m, x[None])[0, target])
    step, fails = 0.015, 0
    while len(out) < n:
        prop = _noise(world, m, rng, x[None], step)[0]
        if m != 2:
            prop = np.clip(prop, lo, hi)
        out.append(prop)
        s = float(world.answer(m, prop[None])[0, target])
        if s > best:
            x, best, fails = prop, s, 0
        else:
            fails += 1
            if fails >= 50:
                step, fails = max(step / 2, 0.002), 0
    return np.asarray(out[:n])


def _brep_walk(world: World, m: int, rng: np.random.Generator, n: int, x: F64, target: int) -> F64:
    """Label-only inversion: walk away from the boundary of the target class."""
    scale = _MASKS.setdefault((id(world), m), _continuous(world, m))
    out = [x]
    while world.answer(m, x[None])[0].argmax() != target and len(out) < n // 4:
        x = _noise(world, m, rng, x[None], 0.05)[0]  # look for a point of the class
        out.append(x)
    radius = 0.01
    while len(out) < n:
        u = rng.standard_normal((8, x.size))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        probes = x + radius * u * scale
        out.extend(probes)
        inside = world.answer(m, probes).argmax(axis=1) == target
        if inside.all():
            radius = min(radius * 1.2, 0.03)
            x = x + 0.5 * radius * scale * u.mean(axis=0)
        else:
            x = x - 0.5 * radius * scale * u[~inside].mean(axis=0)
    return np.asarray(out[:n])


def attack_queries(kind: str, world: World, m: int, rng: np.random.Generator) -> F64:
    if kind in ("shadow", "label_only"):
        return shadow_queries(world, m, rng, kind == "label_only")
    if kind == "confidence":
        return confidence_queries(world, m, rng)
    n = int(rng.integers(1_000, 3_001))
    return inversion_queries(world, m, rng, n, kind == "inversion_seed")


def plan() -> list[tuple[str, str, int]]:
    """(kind, variant, model) of every instance of one seed."""
    models = {
        "shadow": (0, 2),
        "label_only": (LABEL_ONLY_MODEL,),
        "confidence": (0, 2),
        "inversion_noise": (0, 1, 2),
        "inversion_seed": (0, 1, 2),
    }
    return [(k, v, m) for k in KINDS for m in models[k] for v in ("fast", "slow")]


def inject(world: World, tr: Traffic, seed: int, nats: list[str]) -> list[Instance]:
    """Add every planned attack instance to ``tr``; returns the instances (the truth)."""
    rng = np.random.default_rng([seed, 0x9E1])
    instances = []
    for tag, (kind, variant, m) in enumerate(plan()):
        key = new_key(rng)
        server = bool(rng.random() < 0.3)
        ips = caller_ips(rng, server, nats)
        x = attack_queries(kind, world, m, np.random.default_rng([seed, 0x9E2, tag]))
        n = x.shape[0]
        if variant == "fast":
            rate = float(rng.uniform(2, 5))
            t0 = START_MS + int(rng.integers(3_600_000, DAY_MS // 2))
            ts = t0 + (np.arange(n) * 1000 / rate).astype(np.int64)
            nb = int(rng.integers(20, 80))
        else:
            ts = np.sort(START_MS + rng.integers(0, DAY_MS, n))
            nb = n
        bts = np.sort(START_MS + rng.integers(0, DAY_MS, nb))
        tr.add(ts, key, ips, m, x, tag, rng)
        tr.add(bts, key, ips, m, world.natural(m, rng, nb), -2 - tag, rng)
        tr.kinds[key] = f"attack:{kind}/{variant}"
        instances.append(Instance(tag, kind, variant, m, key, tuple(ips), n))
    return instances


def label_only_batch(cols: dict[str, npt.NDArray[Any]], world: World, a: int, b: int) -> EventBatch:
    """:func:`streams.sim.callers.to_batch`, with model 1 answering its label only."""
    batch = to_batch(cols, world, a, b)
    rows = np.flatnonzero(np.asarray(cols["model"][a:b]) == LABEL_ONLY_MODEL)
    if rows.size == 0:
        return batch
    scores = batch.scores.copy()
    labels = batch.output_label.copy()
    names = np.asarray(world.labels[LABEL_ONLY_MODEL], object)
    labels[rows] = names[np.argmax(scores[rows, 0:2], axis=1)]
    scores[rows] = np.nan
    return dataclasses.replace(batch, scores=scores, output_label=labels)
