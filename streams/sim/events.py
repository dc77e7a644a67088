"""The simulator's event rendering: scheduled (ts, caller, model, address) columns to JSON lines
of wire schema v1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from streams.sim.chat import Chat
from streams.sim.population import Population

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EventRenderer:
    """Renders the events of one run; ``drift_model`` (an index into ``models``, -1 for none)
    draws drifted inputs for events at or after ``drift_ms``."""

    pop: Population
    models: list[Any]
    seed: int
    drift_ms: int
    drift_model: int

    def render(self, chunk: int, ts: I64, caller: I64, model: I64, ip: I64) -> list[bytes]:
        """Wire schema v1 lines of scheduled events, in the order given; ``chunk`` seeds
        the draws (ids, status, inputs, scores) so a chunk renders the same every time."""
        p, n = self.pop, ts.shape[0]
        rng = np.random.default_rng([self.seed, 0x7E4D, chunk])
        ids = uuid4(rng, n)
        iso = np.datetime_as_string(ts.astype("datetime64[ms]"), unit="ms").tolist()
        status = np.where(rng.random(n) < 0.005, rng.choice([400, 429, 500, 503], n), 200)
        smax = np.maximum(p.session_ms[caller], 1).astype(np.uint64)
        bucket = ts.astype(np.uint64) // smax * np.uint64(0x9E3779B97F4A7C15)
        sess = [
            f"sess_{h:016x}" if ms else ""
            for h, ms in zip(
                (p.salt[caller] ^ bucket).tolist(), p.session_ms[caller].tolist(), strict=True
            )
        ]
        lines = [b""] * n
        for m, spec in enumerate(self.models):
            pos = np.flatnonzero(model == m)
            if not pos.size:
                continue
            who = caller[pos]
            extras: list[dict[str, int]] | list[None]
            if isinstance(spec, Chat):
                inputs, outputs, extras, latency = spec.render(rng, p.messages[who])
            else:
                drifted = (ts[pos] >= self.drift_ms) & (m == self.drift_model)
                inputs, outputs = spec.render(rng, drifted)
                extras = [None] * pos.size
                latency = spec.latency_ms * rng.lognormal(0.0, 0.35, pos.size)
            at = pos.tolist()
            stamps: list[Any] = ts[pos].tolist() if spec.epoch_ms else [iso[i] + "Z" for i in at]
            rows = zip(
                at,
                stamps,
                p.keys[who].tolist(),
                p.tenant[who].tolist(),
                p.ip_names[ip[pos]].tolist(),
                p.ua[who].tolist(),
                status[pos].tolist(),
                np.round(latency, 1).tolist(),
                inputs,
                outputs,
                extras,
                strict=True,
            )
            for i, t, key, tenant, addr, ua, st, lat, inp, out, extra in rows:
                ev: dict[str, Any] = {
                    "schema_version": 1,
                    "event_id": ids[i],
                    "ts": t,
                    "model_id": spec.model_id,
                    "model_version": spec.version,
                    "tenant": tenant,
                    "api_key_id": key,
                    "client_ip": addr,
                    "user_agent": ua,
                }
                if sess[i]:
                    ev["session_id"] = sess[i]
                ev["status"] = st
                ev["latency_ms"] = lat
                ev["input"] = inp
                if st == 200:
                    ev["output"] = out
                    if extra:
                        ev.update(extra)
                lines[i] = orjson.dumps(ev)
        return lines


def uuid4(rng: np.random.Generator, n: int) -> list[str]:
    hi, lo = rng.integers(0, np.iinfo(np.uint64).max, (2, n), dtype=np.uint64, endpoint=True)
    hi = (hi & np.uint64(0xFFFF_FFFF_FFFF_0FFF)) | np.uint64(0x4000)
    lo = (lo & np.uint64(0x3FFF_FFFF_FFFF_FFFF)) | np.uint64(0x8000_0000_0000_0000)
    hexes = [f"{h:016x}{v:016x}" for h, v in zip(hi.tolist(), lo.tolist(), strict=True)]
    return [f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}" for x in hexes]
