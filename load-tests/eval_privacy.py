"""Detection quality of ``privacy.query_probing`` on simulated attacks and benign callers.

    .venv/bin/python load-tests/eval_privacy.py [--seeds 11 12 13] [--callers 10000]

Per seed: 24 h of at least 10,000 benign callers (``streams.sim.callers``, the population of
part 1) and every attack instance of ``streams.sim.privacy`` (shadow-record and label-only
membership probing, confidence-based membership probing with augmentations, hill-climbing
inversion from noise and from a seed record; fast and slow-and-low), merged in event time,
with ``limit-linear`` answering labels only, and fed in
batches of 10,000 through routing, the reference store (first 2,000 events per model, <= 5%
per caller, as the worker builds it) and the detector with its shipped defaults.

Per attack instance: detected or not, and queries until the first alert that links to the
attacker (count of the attack's own queries up to the alert's ``ts``, and that count as a share
of the attack's queries). Benign callers flagged: a caller counts when any alert links to it:
an alert on its api key, or on a client IP or session it used between the alert's first and
last seen (so an address alert on a NAT flags every caller behind it). References are built
from a benign warm-up hour before the evaluated day (see ``eval_extraction.warmup``): reference
poisoning is a separate question (the reference store caps each caller at 5%). The bound is the
one-sided 95% Clopper-Pearson upper bound. Seed 1 was the development seed; the thresholds were
fixed before the default seeds (11 12 13) and the fresh seeds (21 22 23) were first run. An
instance also counts as "right id" when the first alert on its key carries its ATLAS id."""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval_extraction import linked_callers, replay  # noqa: E402

from detectors.privacy.query_probing.detector import QueryProbing  # noqa: E402
from streams.sim.callers import MODELS, World, benign  # noqa: E402
from streams.sim.privacy import ATLAS, inject, label_only_batch  # noqa: E402


def run_seed(seed: int, callers: int) -> dict[str, object]:
    world = World()
    tr, keys, nats = benign(world, seed, callers)
    instances = inject(world, tr, seed, nats)
    cols = tr.merged()
    alerts, wall, det_s = replay(QueryProbing(), world, seed, cols, label_only_batch)
    episodes, linked, via = linked_callers(alerts, cols)
    ts, n = cols["ts"].astype(np.int64), cols["ts"].size
    first_atlas: dict[str, tuple[int, list[str]]] = {}  # api key -> ATLAS ids of its first alert
    for x in alerts:
        if x.entity_type == "api_key" and (x.entity not in first_atlas
                                           or x.ts_ms < first_atlas[x.entity][0]):  # fmt: skip
            first_atlas[x.entity] = (x.ts_ms, list(x.evidence.get("atlas", [])))
    rows = []
    tag = cols["tag"]
    for inst in instances:
        at = linked.get(inst.key)
        mine = ts[tag == inst.tag]
        q = int((mine <= at).sum()) if at is not None else None
        right = ATLAS[inst.kind] in first_atlas.get(inst.key, (0, []))[1]
        rows.append((inst, q, right))
    flagged = sorted(k for k in keys if k in linked)
    why = [f"{tr.kinds.get(k, '?')} via {'+'.join(sorted(via[k]))}" for k in flagged]
    return {"rows": rows, "flagged": flagged, "why": why, "benign": len(keys), "events": n,
            "wall_s": wall, "det_s": det_s, "alerts": episodes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--callers", type=int, default=10_000)
    args = parser.parse_args()
    print("load average before:", os.getloadavg(), flush=True)
    total_b = total_f = 0
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    all_rows = early = detected = right_id = 0
    for seed in args.seeds:
        res = run_seed(seed, args.callers)
        print(f"\nseed {seed}: {res['events']} events, {res['alerts']} episodes, "
              f"detector {res['det_s']:.1f} s, total {res['wall_s']:.1f} s")  # fmt: skip
        print(f"  {'attack':16} {'variant':7} {'model':16} {'queries':>8} {'to alert':>9} "
              f"{'share':>7} id")  # fmt: skip
        for inst, q, right in res["rows"]:  # type: ignore[attr-defined]
            share = f"{q / inst.queries:.1%}" if q is not None else "missed"
            shown = str(q) if q is not None else "-"
            print(f"  {inst.kind:16} {inst.variant:7} {MODELS[inst.model]:16} {inst.queries:>8} "
                  f"{shown:>9} {share:>7} {'ok' if right else '-'}", flush=True)  # fmt: skip
            k = per_kind[f"{inst.kind}/{inst.variant}"]
            k[1] += 1
            all_rows += 1
            if q is not None:
                k[0] += 1
                detected += 1
                k[3] += right
                right_id += right
            if q is not None and q <= 0.1 * inst.queries:
                k[2] += 1
                early += 1
        fl = res["flagged"]
        total_b += int(res["benign"])  # type: ignore[call-overload]
        total_f += len(fl)  # type: ignore[arg-type]
        print(f"  benign callers flagged: {len(fl)}/{res['benign']}")  # type: ignore[arg-type]
        for caller, why in zip(fl, res["why"], strict=True):  # type: ignore[call-overload]
            print(f"    {caller}: {why}")
    print("\nper attack/variant: detected/total, before 10% of its queries, right ATLAS id")
    for kind, (hit, tot, e, ok) in sorted(per_kind.items()):
        print(f"  {kind:24} {hit}/{tot}  early {e}/{tot}  id {ok}/{hit}")
    print(f"instances detected: {detected}/{all_rows}; before 10%: {early}/{all_rows} "
          f"({early / max(all_rows, 1):.0%}); right ATLAS id on the first alert: "
          f"{right_id}/{detected}")  # fmt: skip
    ub = float(stats.beta.ppf(0.95, total_f + 1, total_b - total_f))
    print(f"benign callers flagged: {total_f}/{total_b}, one-sided 95% upper bound {ub:.2e}")
    print("load average after:", os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
