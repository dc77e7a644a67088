"""Detection quality of ``drift.features`` with its shipped defaults, on 100 numeric features.

Drift types (5 of 100 features, chosen at random per trial; onset at a random event after a
random lead-in, not aligned to hops or windows):

- sudden: mean +1 reference sd from the onset on;
- gradual: each event from the shifted distribution with probability rising 0 -> 1 over 5,000
  events (delay counted from the midpoint);
- incremental: the mean moving linearly 0 -> +1 sd over 5,000 events (delay from the midpoint);
- recurring: +1 sd on for 5,000 events, off for 5,000, three times (each "on" is one onset).

Controls, fed in chunks as numpy matrices straight into the detector's engine: stationary
N(0, 1), and seasonal (event rate ±30 % and every feature's mean ±0.1 reference sd over a 24-hour
cycle of event time, at 100 events/s on average). False alarms are alert episodes; the table
gives the one-sided 95 % Clopper–Pearson upper bound per window length.

Each trial's reference is its stream's first 2,000 events, as the reference store would take
them. Usage::

    .venv/bin/python load-tests/eval_drift.py                    # the recorded run, seed 2026
    .venv/bin/python load-tests/eval_drift.py --seed 7 --control-events 2000000   # development
    .venv/bin/python load-tests/eval_drift.py --baselines        # river and Evidently side by side
    /tmp/ev-venv/bin/python load-tests/eval_drift.py --evidently  # Evidently needs pandas < 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from detectors.drift.features.windows import Engine

FEATURES, DRIFTED, REF = 100, 5, 2_000
NAMES = tuple(f"f{j}" for j in range(FEATURES))
RAMP = 5_000
DAY_S = 86_400.0


PARAMS: dict[str, Any] = {}  # overrides of the shipped defaults (development runs only)


def engine_for(reference: np.ndarray) -> Engine:
    from detectors.drift.bins import build_layout
    from detectors.drift.features.detector import FeatureDrift

    det = FeatureDrift(**PARAMS)
    layout = build_layout(NAMES, (False,) * FEATURES, reference, det.bins)
    return det.track_for_matrix("m", layout)


def shift_profile(kind: str, n: int, onset: int) -> np.ndarray:
    """Per event after the reference: the shift (sd) of the drifted features, or for gradual
    the probability of the new distribution."""
    i = np.arange(n) - onset
    if kind == "sudden":
        return (i >= 0).astype(float)
    if kind in ("gradual", "incremental"):
        return np.clip(i / RAMP, 0.0, 1.0)
    if kind == "recurring":
        return ((i >= 0) & ((i // RAMP) % 2 == 0)).astype(float)
    raise ValueError(kind)


def trial(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    lead = int(rng.integers(3_000, 8_000))
    n = lead + (6 * RAMP if kind == "recurring" else RAMP + 2_000)
    ref = rng.standard_normal((REF, FEATURES))
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    cols = rng.choice(FEATURES, DRIFTED, replace=False)
    prof = shift_profile(kind, n, lead)
    if kind == "gradual":
        x[:, cols] += (rng.random(n) < prof)[:, None].astype(np.float32)
    else:
        x[:, cols] += prof[:, None].astype(np.float32)
    eng = engine_for(ref)
    fires = []
    for a in range(0, n, 10_000):
        fires += [
            c.end_event
            for c in eng.feed(eng.layout.codes(x[a : a + 10_000]))
            if c.status == "firing"
        ]
    onsets = [lead] if kind != "recurring" else [lead + k * 2 * RAMP for k in range(3)]
    origin = RAMP // 2 if kind in ("gradual", "incremental") else 0
    out: dict[str, Any] = {"delays": [], "missed": 0, "false": sum(f < lead for f in fires)}
    for k, start in enumerate(onsets):
        end = onsets[k + 1] if k + 1 < len(onsets) else n
        hit = [f for f in fires if start <= f < end]
        if hit:
            out["delays"].append(hit[0] - (start + origin))
        else:
            out["missed"] += 1
    return out


def control(kind: str, events: int, seed: int, chunk: int = 100_000) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((REF, FEATURES))
    eng = engine_for(ref)
    t, fires, t0 = 0.0, 0, time.perf_counter()
    feed_s = 0.0
    for a in range(0, events, chunk):
        n = min(chunk, events - a)
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
        ts = None
        if kind == "seasonal":
            rate = 100.0 * (1 + 0.3 * np.sin(2 * np.pi * t / DAY_S))
            times = t + np.arange(n) / rate
            t = float(times[-1]) + 1 / rate
            x += (0.1 * np.sin(2 * np.pi * times / DAY_S)).astype(np.float32)[:, None]
            ts = (times * 1000).astype(np.int64)
        s = time.perf_counter()
        fires += sum(c.status == "firing" for c in eng.feed(eng.layout.codes(x), ts))
        feed_s += time.perf_counter() - s
    windows = events // 500
    upper = float(stats.beta.ppf(0.95, fires + 1, windows - fires)) if windows > fires else 1.0
    return {
        "kind": kind,
        "events": events,
        "windows": windows,
        "episodes": fires,
        "upper": upper,
        "us_per_event": feed_s / events * 1e6,
        "wall_s": time.perf_counter() - t0,
    }


def baselines(seed: int) -> None:
    """river ADWIN/KSWIN per feature on 5,000 events, Evidently's preset on 30 windows."""
    rng = np.random.default_rng(seed)
    n, onset = 5_000, 2_500
    x = rng.standard_normal((n, FEATURES))
    cols = rng.choice(FEATURES, DRIFTED, replace=False)
    x[onset:, cols] += 1.0
    try:
        from river import drift
    except ImportError:
        print("river not installed: skipped")
    else:
        for name, make in (
            ("ADWIN", lambda: drift.ADWIN()),
            ("KSWIN", lambda: drift.KSWIN(seed=seed)),
        ):
            dets = [make() for _ in range(FEATURES)]
            alarms: list[tuple[int, int]] = []
            t0 = time.perf_counter()
            for i in range(n):
                row = x[i]
                for j in range(FEATURES):
                    dets[j].update(float(row[j]))
                    if dets[j].drift_detected:
                        alarms.append((i, j))
            us = (time.perf_counter() - t0) / n * 1e6
            before = sum(i < onset for i, _ in alarms)
            drifted = [i for i, j in alarms if i >= onset and j in set(cols.tolist())]
            delay = drifted[0] - onset if drifted else None
            print(
                f"river {name}: {us:.1f} us/event (100 features), alarms before onset "
                f"{before} (on {FEATURES} stationary features x {onset} events), first alarm "
                f"on a drifted feature {delay} events after onset, alarms after onset "
                f"{len(alarms) - before}"
            )
    evidently_windows(rng)


def evidently_windows(rng: np.random.Generator) -> None:
    try:
        import pandas as pd
        from evidently import Report
        from evidently.presets import DataDriftPreset
    except Exception as exc:  # an optional baseline: report why it cannot run
        print(f"Evidently unavailable: {type(exc).__name__}: {exc}")
        return
    ref = pd.DataFrame(rng.standard_normal((REF, FEATURES)), columns=list(NAMES))
    times, alarms = [], []
    for w in range(30):
        cur = rng.standard_normal((500, FEATURES))
        drifted = w >= 15
        if drifted:
            cur[:, :DRIFTED] += 1.0
        t0 = time.perf_counter()
        result = Report([DataDriftPreset()]).run(pd.DataFrame(cur, columns=list(NAMES)), ref)
        times.append(time.perf_counter() - t0)
        share = _drift_share(result.dict())
        alarms.append((drifted, share))
    fa = sum(1 for d, s in alarms if not d and s is not None and s >= 0.5)
    print(
        f"Evidently DataDriftPreset: {np.median(times):.2f} s per 500-event window vs 2,000 "
        f"reference rows (median of 30); dataset drift (share >= 0.5) on stationary windows "
        f"{fa}/15; drifted-column share, stationary windows: "
        f"{[s for d, s in alarms if not d]}; +1 sd on 5 columns: {[s for d, s in alarms if d]}"
    )


def _drift_share(result: dict[str, Any]) -> float | None:
    for metric in result.get("metrics", []):
        value = metric.get("value")
        if isinstance(value, dict) and "share" in value:
            return float(value["share"])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--control-events", type=int, default=50_000_000)
    ap.add_argument("--baselines", action="store_true", help="only river and Evidently")
    ap.add_argument("--evidently", action="store_true", help="only Evidently (its own venv)")
    ap.add_argument("--cusum-k", type=float, default=None, help="development: add the CUSUM")
    args = ap.parse_args()
    if args.cusum_k is not None:
        PARAMS["cusum_k"] = args.cusum_k
    if args.baselines:
        baselines(args.seed)
        return
    if args.evidently:
        evidently_windows(np.random.default_rng(args.seed))
        return
    from detectors.drift.features.detector import FeatureDrift

    rng = np.random.default_rng(args.seed)
    print(f"drift.features: {FeatureDrift(**PARAMS)!r}")
    print("| drift | onsets | detected | median delay | max delay | alarms before onset |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("sudden", "gradual", "incremental", "recurring"):
        results = [trial(kind, rng) for _ in range(args.trials)]
        delays = [d for r in results for d in r["delays"]]
        missed = sum(r["missed"] for r in results)
        total = len(delays) + missed
        false = sum(r["false"] for r in results)
        med = f"{np.median(delays):.0f}" if delays else "-"
        top = f"{max(delays)}" if delays else "-"
        print(f"| {kind} | {total} | {len(delays)} | {med} | {top} | {false} |", flush=True)
    print()
    print("| control | events | window lengths | alert episodes | 95% CP upper bound | us/event |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, kind in enumerate(("stationary", "seasonal")):
        r = control(kind, args.control_events, args.seed + 1 + k)
        print(
            f"| {kind} | {r['events']:,} | {r['windows']:,} | {r['episodes']} | "
            f"{r['upper']:.2e} | {r['us_per_event']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
