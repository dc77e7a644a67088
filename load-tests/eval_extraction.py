"""Detection quality of ``extraction.query_pattern`` on simulated attacks and benign callers.

    .venv/bin/python load-tests/eval_extraction.py [--seeds 11 12 13] [--callers 10000]

Per seed: 24 h of at least 10,000 benign callers (``streams.sim.callers``) and every attack
instance of ``streams.sim.attacks`` (fast and slow-and-low), merged in event time and fed in
batches of 10,000 through routing, the reference store (first 2,000 events per model, <= 5%
per caller, as the worker builds it) and the detector with its shipped defaults.

Per attack instance: detected or not, and queries until the first alert that links to the
attacker (count of the attack's own queries up to the alert's ``ts``, and that count as a share
of the attack's queries). Benign callers flagged: a caller counts when any alert links to it:
an alert on its api key, or on a client IP or session it used between the alert's first and
last seen (so an address alert on a NAT flags every caller behind it). References are built
from a benign warm-up hour before the evaluated day (see ``warmup``): reference poisoning is a
separate question (the reference store caps each caller at 5%). The bound is the
one-sided 95% Clopper-Pearson upper bound. Seed 1 was the development seed; the default seeds
were not used while writing the detector.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detectors.base import AlertChange, DetectorInput, KeySpace, entity_keys  # noqa: E402
from detectors.extraction.query_pattern.detector import QueryPattern  # noqa: E402
from detectors.models.reference_store import ReferenceStore  # noqa: E402
from detectors.models.routing import FeatureIndex, route  # noqa: E402
from streams.sim.attacks import inject  # noqa: E402
from streams.sim.callers import START_MS, Traffic, World, benign, to_batch  # noqa: E402

BATCH = 10_000


def warmup(world: World, seed: int) -> dict[str, Any]:
    """The hour before the evaluated day: 500 other benign callers, 3,000 queries per model,
    from which the references are built (as they would be at deployment)."""
    rng = np.random.default_rng([seed, 0x3A4])
    tr = Traffic()
    for m in range(3):
        x = world.natural(m, rng, 3_000)
        who = rng.integers(0, 500, 3_000)
        ts = np.sort(START_MS - 3_600_000 + rng.integers(0, 3_600_000, 3_000))
        for k in range(500):
            sel = who == k
            if sel.any():
                tr.add(ts[sel], f"warm{k}", ["10.0.0.1"], m, x[sel])
    return tr.merged()


def replay(
    det: Any, world: World, seed: int, cols: dict[str, Any], make_batch: Any = to_batch
) -> tuple[list[AlertChange], float, float]:
    """The references from the warm-up hour, then ``cols`` through routing, the reference
    store and ``det`` in batches; the firing alerts, wall seconds and detector seconds."""
    n = cols["ts"].size
    ks, index, refs = KeySpace(), FeatureIndex(), ReferenceStore()
    warm = warmup(world, seed)
    for a in range(0, warm["ts"].size, BATCH):
        wb = make_batch(warm, world, a, min(a + BATCH, warm["ts"].size))
        refs.update(wb, route(wb, index))
    alerts: list[AlertChange] = []
    t0 = time.perf_counter()
    det_s = 0.0
    for a in range(0, n, BATCH):
        b = min(a + BATCH, n)
        batch = make_batch(cols, world, a, b)
        slots = {
            et: ks[et].lookup(entity_keys(batch, et), batch.ts_ms, batch.partition)
            for et in det.entity_types
        }
        views = route(batch, index)
        refs.update(batch, views)
        t1 = time.perf_counter()
        out = det.update(DetectorInput(batch, slots, ks, 0, views, refs.frozen()))
        out = out + det.advance(int(batch.ts_ms.max()) - 60_000)
        det_s += time.perf_counter() - t1
        alerts.extend(x for x in out.alerts if x.status == "firing")
    det.advance(int(cols["ts"].max()) + 10 * 3_600_000)
    return alerts, time.perf_counter() - t0, det_s


def linked_callers(
    alerts: list[AlertChange], cols: dict[str, Any]
) -> tuple[int, dict[str, int], dict[str, set[str]]]:
    """Episodes, and per api key the earliest alert that links to it (its own key's, or an
    address's or session's it used during the alert's episode) and the entity types linking."""
    first: dict[tuple[str, str, int], tuple[int, int, int]] = {}
    for x in alerts:
        k = (x.entity_type, x.entity, x.episode_start_ms)
        c0, lo, hi = first.get(k, (x.ts_ms, x.first_seen_ms, x.last_seen_ms))
        first[k] = (min(c0, x.ts_ms), min(lo, x.first_seen_ms), max(x.last_seen_ms, hi))
    ts, key = cols["ts"].astype(np.int64), cols["key"]
    linked: dict[str, int] = {}  # api key -> earliest alert ts linking to it
    via: dict[str, set[str]] = defaultdict(set)  # api key -> entity types of linking alerts
    for (et, ent, _), (crossing, lo, hi) in first.items():
        if et == "api_key":
            who = [ent]
        else:
            col = cols["ip"] if et == "client_ip" else cols["session"]
            inside = (col == ent) & (ts >= lo) & (ts <= hi)
            who = sorted(set(key[inside].tolist()))
        for caller in who:
            linked[caller] = min(linked.get(caller, crossing), crossing)
            via[caller].add(et)
    return len(first), linked, via


def run_seed(seed: int, callers: int) -> dict[str, object]:
    world = World()
    tr, keys, nats = benign(world, seed, callers)
    instances = inject(world, tr, seed, nats)
    cols = tr.merged()
    alerts, wall, det_s = replay(QueryPattern(), world, seed, cols)
    episodes, linked, via = linked_callers(alerts, cols)
    ts, n = cols["ts"].astype(np.int64), cols["ts"].size
    rows = []
    tag = cols["tag"]
    for inst in instances:
        at = linked.get(inst.key)
        mine = ts[tag == inst.tag]
        q = int((mine <= at).sum()) if at is not None else None
        rows.append((inst, q))
    flagged = sorted(k for k in keys if k in linked)
    why = [f"{tr.kinds.get(k, '?')} via {'+'.join(sorted(via[k]))}" for k in flagged]
    return {"rows": rows, "flagged": flagged, "why": why, "benign": len(keys), "events": n,
            "wall_s": wall, "det_s": det_s, "alerts": episodes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--callers", type=int, default=10_000)
    args = parser.parse_args()
    total_b = total_f = 0
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    all_rows = early = required = required_early = missed_required = 0
    for seed in args.seeds:
        res = run_seed(seed, args.callers)
        print(f"\nseed {seed}: {res['events']} events, {res['alerts']} episodes, "
              f"detector {res['det_s']:.1f} s, total {res['wall_s']:.1f} s")  # fmt: skip
        print(f"  {'attack':10} {'variant':7} {'model':16} {'queries':>8} {'to alert':>9} "
              f"{'share':>7}")  # fmt: skip
        for inst, q in res["rows"]:  # type: ignore[attr-defined]
            model = ("fraud-scorer", "limit-linear", "doc-embedder-clf")[inst.model]
            share = f"{q / inst.queries:.1%}" if q is not None else "missed"
            shown = str(q) if q is not None else "-"
            print(f"  {inst.kind:10} {inst.variant:7} {model:16} {inst.queries:>8} "
                  f"{shown:>9} {share:>7}")  # fmt: skip
            k = per_kind[f"{inst.kind}/{inst.variant}"]
            k[1] += 1
            all_rows += 1
            # reported, not required by the bar: equation solving, slow natural-data sampling
            req = not (inst.kind == "equation" or (inst.kind, inst.variant) == ("knockoff", "slow"))
            required += req
            missed_required += req and q is None
            if q is not None and q <= 0.1 * inst.queries:
                k[2] += 1
                early += 1
                required_early += req
            if q is not None:
                k[0] += 1
        fl = res["flagged"]
        total_b += int(res["benign"])  # type: ignore[call-overload]
        total_f += len(fl)  # type: ignore[arg-type]
        print(f"  benign callers flagged: {len(fl)}/{res['benign']}")  # type: ignore[arg-type]
        for caller, why in zip(fl, res["why"], strict=True):  # type: ignore[call-overload]
            print(f"    {caller}: {why}")
    print("\nper attack/variant: detected/total, detected before 10% of its queries")
    for kind, (hit, tot, e) in sorted(per_kind.items()):
        print(f"  {kind:18} {hit}/{tot}  early {e}/{tot}")
    print(f"all instances detected before 10%: {early}/{all_rows}")
    print(f"required instances (all but equation and slow knockoff): missed {missed_required}, "
          f"detected before 10% {required_early}/{required}")  # fmt: skip
    ub = float(stats.beta.ppf(0.95, total_f + 1, total_b - total_f))
    print(f"benign callers flagged: {total_f}/{total_b}, one-sided 95% upper bound {ub:.2e}")


if __name__ == "__main__":
    main()
