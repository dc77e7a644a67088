"""Query-based attacks on the models of :mod:`streams.sim.callers`, written from the published
descriptions; each queries the model's answers as it goes (the attacks are adaptive).

- ``random`` / ``grid`` extraction (Tramèr et al. 2016): uniform random inputs over the
  feature ranges; a lattice over two or three features around natural base records.
- ``jacobian`` (Papernot et al. 2017): 100 natural seeds; each round fits a substitute (a
  least-squares softmax-free linear model on the oracle's labels) and adds
  ``x + lambda * sign(grad of the substitute's score for the oracle's label)`` for every x of
  the set, lambda = 0.1 of the feature range, the sign alternating every three rounds.
- ``knockoff`` (Orekondy et al. 2019): natural inputs from another distribution (a shifted
  population, or another corpus of embeddings), picked by a gradient bandit over 20 clusters
  of the pool with a reward for uncertain answers and rarely seen classes.
- ``equation`` (Tramèr et al. 2016): d+1 to 10 d random inputs to a logistic regression.
- ``boundary`` (Brendel et al. 2018): from a natural input of another class, orthogonal
  steps on the sphere around the target and steps towards it, both sizes adapted to keep about
  half the proposals adversarial; label only; 1,000-5,000 queries per target.
- ``zoo`` (Chen et al. 2017): symmetric finite differences (h = 1e-4 of the range) on 8
  random coordinates per iteration and ADAM steps on the target class's log-probability.

Each instance comes ``fast`` (the attack at 2-5 queries/s, inside the key's ordinary day of
benign queries) or ``slow`` (spread over 24 h, one benign query of the same key per attack
query). Attacker keys, addresses and user agents are drawn like benign callers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streams.sim.callers import DAY_MS, START_MS, Traffic, World, caller_ips, new_key

F64 = npt.NDArray[np.float64]
KINDS = ("random", "grid", "jacobian", "knockoff", "equation", "boundary", "zoo")


@dataclass(frozen=True)
class Instance:
    tag: int
    kind: str
    variant: str  # fast | slow
    model: int
    key: str
    ips: tuple[str, ...]
    queries: int  # attack queries (benign ones of the same key not counted)


def _labels(world: World, m: int, x: F64) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = world.answer(m, x).argmax(axis=1)
    return out


def random_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    lo, hi = world.lo[m], world.hi[m]
    out: F64 = lo + (hi - lo) * rng.random((n, lo.size))
    return out


def grid_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    lo, hi = world.lo[m], world.hi[m]
    parts, total = [], 0
    while total < n:
        base = world.natural(m, rng, 1)[0]
        feats = rng.choice(lo.size, 3, replace=False)
        axes = [np.linspace(lo[f], hi[f], 8) for f in feats]
        mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        x = np.repeat(base[None], mesh.shape[0], axis=0)
        x[:, feats] = mesh
        parts.append(x)
        total += x.shape[0]
    return np.concatenate(parts)[:n]


def jacobian_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    lo, hi = world.lo[m], world.hi[m]
    lam = 0.1 * (hi - lo)
    s = world.natural(m, rng, 100)
    queried = [s]
    y = _labels(world, m, s)
    rnd = 0
    while sum(q.shape[0] for q in queried) < n:
        k = int(max(y.max() + 1, 2))
        onehot = np.eye(k)[y]
        a = np.c_[(s - lo) / (hi - lo), np.ones(s.shape[0])]
        w, *_ = np.linalg.lstsq(a, onehot, rcond=None)  # substitute: linear scores
        grad = w[:-1, :].T[y] / (hi - lo)  # d score_label / dx
        sign = 1.0 if (rnd // 3) % 2 == 0 else -1.0
        new = np.clip(s + sign * lam * np.sign(grad), lo, hi)
        queried.append(new)
        s = np.concatenate([s, new])
        y = np.concatenate([y, _labels(world, m, new)])
        rnd += 1
    return np.concatenate(queried)[:n]


def knockoff_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    if m == 2:  # another corpus: embeddings around other topics
        c = rng.standard_normal((12, 32))
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        v = c[rng.integers(0, 12, 20_000)] + rng.normal(0, 0.22, (20_000, 32))
        pool = np.round(v / np.linalg.norm(v, axis=1, keepdims=True), 4)
    else:
        pool = world.natural(m, rng, 20_000, shift=1.0)
    centres = pool[rng.choice(pool.shape[0], 20, replace=False)]
    cluster = ((pool[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
    pref, seen, out = np.zeros(20), np.ones(8), []
    mean_r, lr = 0.0, 0.1
    for i in range(n):
        p = np.exp(pref - pref.max())
        p /= p.sum()
        arm = int(rng.choice(20, p=p))
        members = np.flatnonzero(cluster == arm)
        x = pool[members[int(rng.integers(members.size))]]
        sc = world.answer(m, x[None])[0]
        top = np.sort(sc)[::-1]
        label = int(sc.argmax())
        reward = float(top[0] - top[1] < np.median(np.abs(top[:2]))) + 1.0 / seen[label % 8]
        seen[label % 8] += 1
        mean_r += (reward - mean_r) / (i + 1)
        grad = -p
        grad[arm] += 1.0
        pref += lr * (reward - mean_r) * grad
        out.append(x)
    return np.asarray(out)


def boundary_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    scale = world.hi[m] - world.lo[m]
    out: list[F64] = []
    while len(out) < n:
        x0 = world.natural(m, rng, 1)[0]
        y0 = _labels(world, m, x0[None])[0]
        cands = world.natural(m, rng, 200)
        adv = cands[_labels(world, m, cands) != y0]
        if adv.shape[0] == 0:
            continue
        cur = adv[0].copy()
        delta, eps = 0.1, 0.1
        budget = min(n - len(out), int(rng.integers(1_000, 5_001)))
        ok_orth: list[bool] = []
        for _ in range(budget):
            diff = (cur - x0) / scale
            dist = float(np.linalg.norm(diff))
            eta = rng.standard_normal(cur.size)
            eta -= (eta @ diff) / max(dist**2, 1e-12) * diff
            eta *= delta * dist / max(float(np.linalg.norm(eta)), 1e-12)
            step = diff + eta
            norm = max(float(np.linalg.norm(step)), 1e-12)
            prop = (x0 / scale + step * (1 - eps) * dist / norm) * scale
            out.append(prop)
            good = _labels(world, m, prop[None])[0] != y0
            ok_orth.append(bool(good))
            if good:
                cur = prop
            if len(ok_orth) >= 10:
                rate = float(np.mean(ok_orth[-10:]))
                delta *= 1.1 if rate > 0.5 else 0.9
                eps *= 1.1 if rate > 0.5 else 0.9
                eps = float(np.clip(eps, 1e-4, 0.5))
    return np.asarray(out[:n])


def zoo_queries(world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    scale = world.hi[m] - world.lo[m]
    out: list[F64] = []
    while len(out) < n:
        x = world.natural(m, rng, 1)[0].astype(np.float64)
        y0 = int(_labels(world, m, x[None])[0])
        mom, vel = np.zeros(x.size), np.zeros(x.size)
        for _ in range(int(rng.integers(60, 200))):
            coords = rng.choice(x.size, min(8, x.size), replace=False)
            h = 1e-4 * scale[coords]
            plus = np.repeat(x[None], coords.size, axis=0)
            minus = plus.copy()
            plus[np.arange(coords.size), coords] += h
            minus[np.arange(coords.size), coords] -= h
            q = np.concatenate([plus, minus])
            out.extend(q)
            sc = world.answer(m, q)
            if world.score_type[m] == "probability":
                f = np.log(np.maximum(sc[:, y0], 1e-12))
            else:
                f = sc[:, y0] - np.log(np.exp(sc).sum(axis=1))
            g = (f[: coords.size] - f[coords.size :]) / (2 * h)
            mom[coords] = 0.9 * mom[coords] + 0.1 * g
            vel[coords] = 0.999 * vel[coords] + 0.001 * g * g
            step = 0.01 * scale[coords] * mom[coords] / (np.sqrt(vel[coords]) + 1e-8)
            x[coords] -= step  # descend the target class's log-probability
    return np.asarray(out[:n])


_GEN = {
    "random": random_queries,
    "grid": grid_queries,
    "jacobian": jacobian_queries,
    "knockoff": knockoff_queries,
    "equation": random_queries,
    "boundary": boundary_queries,
    "zoo": zoo_queries,
}


def attack_queries(kind: str, world: World, m: int, rng: np.random.Generator, n: int) -> F64:
    return np.asarray(_GEN[kind](world, m, rng, n), np.float64)


def plan(seed: int) -> list[tuple[str, str, int, int]]:
    """(kind, variant, model, attack queries) of every instance of one seed."""
    rng = np.random.default_rng([seed, 0xA77])
    out = []
    for kind in KINDS:
        models = (1,) if kind == "equation" else (0, 2)
        for m in models:
            for variant in ("fast", "slow"):
                if kind == "equation":
                    n = int(rng.integers(11, 101))  # d+1 .. 10 d for d = 10
                elif kind == "boundary":
                    n = int(rng.integers(1_000, 5_001))
                else:
                    n = int(rng.integers(2_000, 10_001))
                out.append((kind, variant, m, n))
    return out


def inject(world: World, tr: Traffic, seed: int, nats: list[str]) -> list[Instance]:
    """Add every planned attack instance to ``tr``; returns the instances (the truth)."""
    rng = np.random.default_rng([seed, 0xA770])
    instances = []
    for tag, (kind, variant, m, n) in enumerate(plan(seed)):
        key = new_key(rng)
        server = bool(rng.random() < 0.3)
        ips = caller_ips(rng, server, nats)
        x = attack_queries(kind, world, m, np.random.default_rng([seed, tag]), n)
        if variant == "fast":
            rate = float(rng.uniform(2, 5))
            t0 = START_MS + int(rng.integers(3_600_000, DAY_MS // 2))
            ts = t0 + (np.arange(n) * 1000 / rate).astype(np.int64)
            nb = int(rng.integers(20, 80))
            bts = np.sort(START_MS + rng.integers(0, DAY_MS, nb))
        else:
            ts = np.sort(START_MS + rng.integers(0, DAY_MS, n))
            nb = n
            bts = np.sort(START_MS + rng.integers(0, DAY_MS, nb))
        tr.add(ts, key, ips, m, x, tag, rng)
        tr.add(bts, key, ips, m, world.natural(m, rng, nb), -2 - tag, rng)
        instances.append(Instance(tag, kind, variant, m, key, tuple(ips), n))
    return instances
