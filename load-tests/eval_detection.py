"""Detection quality of the shipped detectors on simulated traffic, with their shipped defaults.

    .venv/bin/python load-tests/eval_detection.py [--seeds 101 102 103] [--events 100000]

For each seed: simulate the ``default`` scenario (benign population with heavy and
odd-but-honest callers, plus labelled incidents) and the ``quiet`` one (benign only), replay
each through a worker into a fresh chdb store, and score the alerts against the truth with
``streams.sim.scoring``. Prints, per incident kind, detected/total and the detection delay in event
time and in the attacker's events; and the benign callers alerted over all benign callers. The
seeds are not the demo's (7) nor any seed used while writing the detectors.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def replay(path: Path, store_dir: Path) -> None:
    source, store = f"file:{path}", f"chdb:{store_dir}"
    subprocess.run(
        [sys.executable, "-m", "streams.cli", "run", "-q", "--source", source, "--store", store],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )


def attacker_events_before(path: Path, entity_field: str, entity: str, lo: int, hi: int) -> int:
    """Events of the incident's entity from its start up to the alert (the delay in events)."""
    from schemas.decode import decode

    n = 0
    with path.open("rb") as fh:
        for line in fh:
            if entity.encode() not in line:
                continue
            ev = decode([line.rstrip(b"\n")]).batch
            if ev.n and getattr(ev, entity_field)[0] == entity and lo <= ev.ts_ms[0] <= hi:
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    from streams.sim.scoring import evaluate
    from streams.sim.simulate import simulate, write
    from streams.store.store import Store

    detected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    delays: dict[str, list[tuple[float, int]]] = defaultdict(list)
    benign_alerted = benign_total = 0
    fields = {"api_key": "api_key_id", "client_ip": "client_ip", "model": "model_id"}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for scenario in ("default", "quiet"):
                path = Path(tmp) / f"{scenario}-{seed}.jsonl"
                write(scenario, args.events, seed, path)
                store_dir = Path(tmp) / f"store-{scenario}-{seed}"
                replay(path, store_dir)
                _, truth = simulate(scenario, args.events, seed)
                with Store(f"chdb:{store_dir}") as store:
                    ev = evaluate(store, truth)
                benign_alerted += len(ev.benign_alerted)
                benign_total += ev.benign_callers
                for r in ev.incidents:
                    inc = r.incident
                    detected[inc.kind][1] += 1
                    if r.detected and r.delay_ms is not None:
                        detected[inc.kind][0] += 1
                        n = attacker_events_before(
                            path, fields[inc.entity_type], inc.entity, inc.start_ts_ms,
                            inc.start_ts_ms + r.delay_ms,
                        )  # fmt: skip
                        delays[inc.kind].append((r.delay_ms / 1000, n))
                print(
                    f"seed {seed} {scenario:8} incidents {ev.detected}/{len(ev.incidents)}  "
                    f"benign keys alerted {len(ev.benign_alerted)}/{ev.benign_callers}  "
                    f"false alarms {len(ev.false_alarms)}",
                    flush=True,
                )
    print("\nper incident kind: detected/total, delay (event-time s, entity events) per instance")
    for kind, (hit, total) in sorted(detected.items()):
        shown = ", ".join(f"{s:.0f} s/{n} ev" for s, n in delays[kind])
        print(f"  {kind:18} {hit}/{total}   {shown}")
    rate = benign_alerted / benign_total if benign_total else 0.0
    print(f"benign api keys alerted: {benign_alerted}/{benign_total} ({rate:.3%})")


if __name__ == "__main__":
    main()
