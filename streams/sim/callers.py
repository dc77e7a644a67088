"""Benign callers of the query-pattern evaluation: at least 10,000 api keys over 24 simulated
hours on three models, as columns (no JSON), plus the models the attackers query.

Models (deterministic functions of their inputs, so an attacker can query any point):
``fraud-scorer`` (16 numeric features with the simulator's marginals, two-class probabilities),
``limit-linear`` (a logistic regression on 10 numeric features: the target of equation
solving) and ``doc-embedder-clf`` (the simulator's 32-dim unit embeddings, five-class logits).

Caller kinds, all honest: app callers (a few to a hundred queries a day), batch-scoring
services (runs of thousands of records at 20/s), retry loops (each query sent 1-5 times),
callers re-querying the same records (a small pool, sometimes with one field edited),
what-if explorers (a record and up to 10 edits of one or two fields), regression-test fixtures
(the same 50-300 records, one in ten an edge case at the feature range, several runs a day),
and a quarter of the app-like callers behind 30 shared NAT addresses. Keys, user agents and
addresses come from the same formats and pools as the main simulator's; attackers
(:mod:`streams.sim.attacks`) are drawn by the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.batch import EventBatch, empty_batch
from streams.sim.models import FRAUD_NUM, Vector
from streams.sim.population import _APP_UAS, _INTERNAL_POOLS, _PUBLIC_POOLS, _SERVER_UAS

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Objs = npt.NDArray[np.object_]
DAY_MS = 86_400_000
START_MS = 1_767_225_600_000
MODELS = ("fraud-scorer", "limit-linear", "doc-embedder-clf")
WIDTH = 32  # widest input (the embeddings)


class World:
    """The three models: natural samplers, plausible ranges and answers."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20_260_601)
        self.fraud_w = rng.normal(0.0, 0.9, 16)
        self.lin_w = rng.normal(0.0, 0.4, 10)
        self.lin_loc = rng.uniform(10, 200, 10)
        self.lin_scale = self.lin_loc * rng.uniform(0.1, 0.5, 10)
        self.doc = Vector()
        self.dims = (16, 10, 32)
        self.score_type = ("probability", "probability", "logit")
        self.labels = (("legit", "fraud"), ("decline", "approve"), ("c0", "c1", "c2", "c3", "c4"))
        nat = [self.natural(m, np.random.default_rng([7, m]), 20_000) for m in range(3)]
        self.lo = [np.quantile(x, 0.001, axis=0) for x in nat]
        self.hi = [np.quantile(x, 0.999, axis=0) for x in nat]

    def natural(self, model: int, rng: np.random.Generator, n: int, shift: float = 0.0) -> F64:
        """``n`` natural inputs; ``shift`` moves a caller's segment (latent sd units)."""
        if model == 0:
            z = rng.standard_normal((n, 16)) + shift
            feats: F64 = _fraud_features(z)
            return feats
        if model == 1:
            z = rng.standard_normal((n, 10)) + shift
            return np.round(self.lin_loc + self.lin_scale * z, 2)
        c = self.doc.centroids[rng.integers(0, 5, n)]
        v = c + rng.normal(0.0, 0.22, (n, 32)) + shift * 0.05
        unit: F64 = np.round(v / np.linalg.norm(v, axis=1, keepdims=True), 4)
        return unit

    def answer(self, model: int, x: F64) -> F64:
        """Scores per class (probabilities, or logits for the embeddings)."""
        if model == 2:
            out: F64 = x @ self.doc.w.T + self.doc.b
            return out
        if model == 0:
            u = _fraud_latent(x)
            logit = -3.5 + u @ self.fraud_w + 0.4 * u[:, 0] * u[:, 2]
        else:
            logit = ((x - self.lin_loc) / self.lin_scale) @ self.lin_w * 2.0 - 1.0
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
        return np.stack([1 - p, p], axis=1)


def _fraud_features(z: F64) -> F64:
    cols = []
    for j, (_, tf, loc, scale, dec, lo, hi) in enumerate(FRAUD_NUM):
        x = loc + scale * z[:, j]
        if tf == "exp":
            x = np.exp(x)
        elif tf == "sig":
            x = 1.0 / (1.0 + np.exp(-x))
        elif tf == "count":
            x = np.floor(np.exp(x) - 0.5)
        elif tf == "bin":
            x = (z[:, j] > loc).astype(np.float64)
        cols.append(np.round(np.clip(x, lo, hi), dec))
    return np.stack(cols, axis=1)


def _fraud_latent(x: F64) -> F64:
    """The fraud model reads its inputs on a log / logit scale, standardised."""
    u = np.empty_like(x)
    for j, (_, tf, loc, scale, _d, _lo, _hi) in enumerate(FRAUD_NUM):
        c = x[:, j]
        if tf == "exp":
            v = np.log(np.maximum(c, 1e-3))
        elif tf == "sig":
            v = np.log(np.clip(c, 1e-4, 1 - 1e-4) / (1 - np.clip(c, 1e-4, 1 - 1e-4)))
        elif tf == "count":
            v = np.log(np.maximum(c, 0.0) + 1.0)
        else:
            v = c * scale + loc
        u[:, j] = (v - loc) / scale
    return np.clip(u, -6, 6)


@dataclass
class Traffic:
    """Events as columns; ``x`` rows are inputs padded with NaN to ``WIDTH``."""

    ts: list[I64] = field(default_factory=list)
    key: list[Objs] = field(default_factory=list)
    ip: list[Objs] = field(default_factory=list)
    session: list[Objs] = field(default_factory=list)
    model: list[I64] = field(default_factory=list)
    x: list[npt.NDArray[Any]] = field(default_factory=list)
    tag: list[I64] = field(default_factory=list)  # -1 benign, else the attack instance
    kinds: dict[str, str] = field(default_factory=dict)  # api key -> caller kind

    def add(self, ts: I64, key: str, ips: list[str], model: int, x: F64, tag: int = -1,
            rng: np.random.Generator | None = None, session_ms: int = 0) -> None:  # fmt: skip
        n = ts.size
        pad = np.full((n, WIDTH), np.nan, np.float32)
        pad[:, : x.shape[1]] = x
        pick = (
            rng.integers(0, len(ips), n) if rng is not None and len(ips) > 1 else np.zeros(n, int)
        )
        self.ts.append(ts.astype(np.int64))
        self.key.append(np.full(n, key, object))
        self.ip.append(np.asarray(ips, object)[pick])
        sess = [f"sess_{key[4:]}{int(t) // session_ms:06x}" for t in ts.tolist()] \
            if session_ms else [""] * n  # fmt: skip
        self.session.append(np.asarray(sess, object))
        self.model.append(np.full(n, model, np.int64))
        self.x.append(pad)
        self.tag.append(np.full(n, tag, np.int64))

    def merged(self) -> dict[str, npt.NDArray[Any]]:
        cols = {k: np.concatenate(getattr(self, k)) for k in
                ("ts", "key", "ip", "session", "model", "x", "tag")}  # fmt: skip
        order = np.argsort(cols["ts"], kind="stable")
        return {k: v[order] for k, v in cols.items()}


def new_key(rng: np.random.Generator) -> str:
    return f"key_{int(rng.integers(1 << 48)):012x}"


def new_ip(rng: np.random.Generator, internal: bool = False) -> str:
    pools = _INTERNAL_POOLS if internal else _PUBLIC_POOLS
    return f"{pools[int(rng.integers(len(pools)))]}.{int(rng.integers(1, 255))}"


def caller_ips(rng: np.random.Generator, server: bool, nats: list[str]) -> list[str]:
    """Addresses of one caller, benign or not: a server's one internal address, an app's one
    to three public ones, or (a quarter of app callers) a shared NAT address."""
    if server:
        return [new_ip(rng, True)]
    if nats and rng.random() < 0.25:
        return [nats[int(rng.integers(len(nats)))]]
    return [new_ip(rng) for _ in range(int(rng.integers(1, 4)))]


def _times(rng: np.random.Generator, n: int, t0: int = START_MS) -> I64:
    return np.sort(t0 + rng.integers(0, DAY_MS, n))


def benign(world: World, seed: int, callers: int = 10_000) -> tuple[Traffic, list[str], list[str]]:
    """The benign population: traffic, its api keys, and the shared NAT addresses."""
    rng = np.random.default_rng([seed, 0xBE9])
    tr, keys = Traffic(), []
    nats = [new_ip(rng) for _ in range(30)]
    kinds = rng.choice(7, callers, p=[0.70, 0.005, 0.05, 0.08, 0.03, 0.01, 0.125])
    names = ("app", "batch", "retry", "requery", "whatif", "fixtures", "heavy_app")
    for kind in kinds.tolist():
        key = new_key(rng)
        keys.append(key)
        tr.kinds[key] = names[kind]
        model = int(rng.choice(3, p=[0.5, 0.2, 0.3]))
        server = kind in (1, 5)
        ips = caller_ips(rng, server, nats)
        sess = 0 if server else int(rng.integers(10, 40)) * 60_000
        shift = float(rng.normal(0, 0.3))
        if kind in (0, 6):  # app callers (6: a heavier app)
            n = max(1, int(rng.lognormal(np.log(15 if kind == 0 else 120), 0.8)))
            tr.add(_times(rng, n), key, ips, model, world.natural(model, rng, n, shift), -1,
                   rng, sess)  # fmt: skip
        elif kind == 1:  # batch scoring: runs of thousands at 20/s
            for _ in range(int(rng.integers(2, 7))):
                n = int(rng.integers(1_000, 5_000))
                t0 = START_MS + int(rng.integers(0, DAY_MS - 400_000))
                ts = t0 + (np.arange(n) * 50 + rng.integers(0, 50, n))
                tr.add(ts, key, ips, model, world.natural(model, rng, n, shift))
        elif kind == 2:  # retry loops
            n = max(1, int(rng.lognormal(np.log(30), 0.7)))
            reps = 1 + rng.geometric(0.5, n).clip(max=5) - 1
            x = np.repeat(world.natural(model, rng, n, shift), reps, axis=0)
            ts = np.repeat(_times(rng, n), reps) + np.arange(x.shape[0]) % 5 * 1500
            tr.add(ts, key, ips, model, x, -1, rng, sess)
        elif kind == 3:  # re-querying a pool of records, sometimes edited
            n = max(2, int(rng.lognormal(np.log(40), 0.7)))
            pool = world.natural(model, rng, int(rng.integers(5, 30)), shift)
            x = pool[rng.integers(0, pool.shape[0], n)].copy()
            edit = rng.random(n) < 0.2
            col = rng.integers(0, x.shape[1], n)
            x[edit, col[edit]] *= 1.0 + rng.choice([-0.05, 0.05, 0.1], int(edit.sum()))
            tr.add(_times(rng, n), key, ips, model, x, -1, rng, sess)
        elif kind == 4:  # what-if explorers
            recs = int(rng.integers(2, 12))
            base = world.natural(model, rng, recs, shift)
            parts = []
            for r in range(recs):
                k = int(rng.integers(1, 11))
                v = np.repeat(base[r : r + 1], k, axis=0)
                cols = rng.integers(0, v.shape[1], (k, 2))
                steps = 1.0 + np.arange(k)[:, None] * rng.choice([0.02, 0.05, 0.1])
                v[np.arange(k)[:, None], cols] *= steps
                parts.append(v)
            x = np.concatenate(parts)
            starts = _times(rng, recs)
            ts = (
                np.repeat(starts, [p.shape[0] for p in parts]) + np.arange(x.shape[0]) % 11 * 20_000
            )
            tr.add(ts, key, ips, model, x, -1, rng, sess)
        else:  # kind 5: regression fixtures, one in ten an edge case, several runs a day
            k = int(rng.integers(50, 300))
            fx = world.natural(model, rng, k)
            edge = rng.random(k) < 0.1
            fx[edge] = np.where(rng.random((int(edge.sum()), fx.shape[1])) < 0.5,
                                world.lo[model], world.hi[model])  # fmt: skip
            for _ in range(int(rng.integers(4, 13))):
                t0 = START_MS + int(rng.integers(0, DAY_MS - 100_000))
                tr.add(t0 + np.arange(k) * 200, key, ips, model, fx)
    return tr, keys, nats


def to_batch(cols: dict[str, npt.NDArray[Any]], world: World, a: int, b: int) -> EventBatch:
    """Rows ``a:b`` of merged traffic as an :class:`EventBatch`, with the models' answers."""
    sl = slice(a, b)
    n = b - a
    model = np.asarray(cols["model"][sl], np.int64)
    x = np.asarray(cols["x"][sl], np.float64)
    num_names = tuple(f"f{j:02d}" for j in range(16)) + tuple(f"l{j}" for j in range(10))
    num = np.full((n, 26), np.nan)
    vec = np.full((n, 32), np.nan)
    scores = np.full((n, 7), np.nan)
    for m, cs in ((0, slice(0, 16)), (1, slice(16, 26))):
        rows = model == m
        num[rows, cs] = x[rows, : self_dims(m)]
        scores[rows, 0:2] = world.answer(m, x[rows, : self_dims(m)])
    rows = model == 2
    vec[rows] = x[rows]
    scores[rows, 2:7] = world.answer(2, x[rows])

    def obj(v: Any) -> Objs:
        return np.asarray(v, object)

    names = np.asarray(MODELS, object)[model]
    return dataclasses.replace(
        empty_batch(),
        event_id=obj([f"ev{a + i}" for i in range(n)]),
        ts_ms=np.asarray(cols["ts"][sl], np.int64),
        model_id=names,
        api_key_id=obj(cols["key"][sl]),
        model_version=obj(np.full(n, "1")),
        tenant=obj(np.full(n, "t")),
        client_ip=obj(cols["ip"][sl]),
        user_agent=obj(np.full(n, _APP_UAS[0] if n else "")),
        session_id=obj(cols["session"][sl]),
        status=np.full(n, 200, np.int32),
        latency_ms=np.full(n, np.nan),
        tokens_in=np.full(n, -1, np.int64),
        tokens_out=np.full(n, -1, np.int64),
        num_names=num_names,
        num_values=num,
        cat_codes=np.zeros((n, 0), np.int32),
        vector=vec,
        vector_len=np.where(model == 2, 32, 0).astype(np.int32),
        prompt=obj(np.full(n, "")),
        output_label=obj(np.full(n, "")),
        score_labels=("p0", "p1", "c0", "c1", "c2", "c3", "c4"),
        scores=scores,
        output_value=np.full(n, np.nan),
        output_text=obj(np.full(n, "")),
        finish_reason=obj(np.full(n, "")),
        ground_truth=obj(np.full(n, "")),
        attributes=obj(np.full(n, "")),
        partition=np.zeros(n, np.int32),
        offset=np.arange(a, b, dtype=np.int64),
        payload_bytes=np.full(n, 500, np.int32),
    )


def self_dims(model: int) -> int:
    return (16, 10, 32)[model]


SERVER_UAS = _SERVER_UAS
