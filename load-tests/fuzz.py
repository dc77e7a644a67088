"""Hostile input at volume: the seeded mutation fuzzer (tests/support/fuzzer.py) through the decoder
and
every registered detector, in batches of 1,000.

    .venv/bin/python load-tests/fuzz.py [--messages 1000000] [--seed 7] [--batch 1000]

Prints the seed, the messages per kind of mutation, the rejects per reason, and throughput:
messages/s through decode + detectors (generation excluded) and end to end. Checks as it goes
that every message is accepted or rejected exactly once, every reject has a reason in
``REJECT_REASONS`` and a detail, and every message the fuzzer made valid by construction is
accepted; exits 1 otherwise, naming the seed. The store is left out
(tests/streams/worker/test_fuzz.py writes
100,000 of these through a worker into chdb); load-tests/bench_pipeline.py measures the store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    ap.add_argument("--batch", type=int, default=1_000)
    ap.add_argument("--big-odds", type=float, default=0.005, help="share of expensive sizes")
    args = ap.parse_args()

    from fuzzer import Fuzzer
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from detectors.registry import create_all, names
    from schemas.batch import REJECT_REASONS
    from streams.worker.pipeline import Pipeline

    print(f"fuzz seed {args.seed} (replay: --seed {args.seed}); detectors: {', '.join(names())}")
    fuzzer = Fuzzer(args.seed, big_odds=args.big_odds)
    pipeline = Pipeline(create_all())
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    accepted = problems = 0
    processing_s = 0.0
    t_start = time.perf_counter()
    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("fuzzing", total=args.messages)
        for start in range(0, args.messages, args.batch):
            made = list(fuzzer.messages(min(args.batch, args.messages - start)))
            messages = [m for m, _, _ in made]
            n = len(messages)
            offsets = np.arange(start, start + n, dtype=np.int64)
            t0 = time.perf_counter()
            result = pipeline.process(messages, np.zeros(n, np.int32), offsets)
            processing_s += time.perf_counter() - t0
            decoded = result.decoded
            rows = set(decoded.rows.tolist())
            seen = sorted([*rows, *(r.index for r in decoded.rejects)])
            problems += seen != list(range(n))
            for r in decoded.rejects:
                reasons[r.reason] += 1
                problems += r.reason not in REJECT_REASONS or not r.detail
            for i, (_, kind, valid) in enumerate(made):
                kinds[kind.split(":")[0]] += 1
                if valid is not None and valid != (i in rows):
                    problems += 1
                    print(f"seed {args.seed}: message {start + i} ({kind}) valid={valid}")
            accepted += decoded.batch.n
            progress.advance(task, n)
    total_s = time.perf_counter() - t_start

    rejected = sum(reasons.values())
    print(f"\nmessages {args.messages:,}: accepted {accepted:,}, rejected {rejected:,}")
    for reason, count in reasons.most_common():
        print(f"  {reason:24} {count:>10,}")
    print("kinds: " + ", ".join(f"{k}={v:,}" for k, v in kinds.most_common()))
    print(
        f"decode + detectors: {args.messages / processing_s:,.0f} messages/s "
        f"({processing_s:.1f} s); end to end with generation: "
        f"{args.messages / total_s:,.0f} messages/s ({total_s:.1f} s)"
    )
    print(
        f"machine: {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    )
    ok = problems == 0 and accepted + rejected == args.messages
    print(f"seed {args.seed}: " + ("OK" if ok else f"{problems} PROBLEMS"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
