"""Seeded traffic simulator: wire schema v1 events (JSONL) plus a truth file.

Traffic model. A bank runs four models behind its gateways: two tabular classifiers
(``fraud-scorer``: 16 numeric + 2 categorical features, two-class probabilities;
``credit-risk``: 12 numeric + 2 categorical, three-class probabilities), a document classifier
on 32-dim embeddings (``doc-embedder-clf``: logits; its gateway writes ``ts`` as epoch ms) and
an LLM support chat (``support-chat``: templated bank-support prompts and answers, tokens; its
gateway flushes every 1.5 s, so its ``ts`` arrive up to 1.5 s out of order). Scores come from
fixed random softmax models of the features, so they follow the inputs.

About 550 benign callers (api keys) with heavy-tailed rates: most are light apps and partners
(~0.5 events/min), a few are steady batch scorers (~30 events/min), and some are odd but honest
in a steady way: cron jobs that burst every 5-15 minutes, keys that go silent for long
stretches, dozens of keys behind three NAT addresses, keys with odd user agents. Event counts are
Poisson given each caller's rate per 10 s slice, conditioned on the exact total asked for; the
span is ~2 h per 100,000 events (at least 30 min).

Incidents (``default`` only): a light key jumps 20-50x for ~10 minutes (a stolen key on the
LLM); a heavy batch key goes 5-10x (bulk scraping of the fraud model); twenty light keys all
move to one client IP and triple their rates (the IP jumps ~20x, no key more than 3x); and the
``credit-risk`` applicant population shifts for the last 45% of the span, so its predictions
drift.

Attackers are drawn by the same code as benign callers of their class: same key format,
tenants, user-agent pool and /24 address pools, and they keep sending ordinary traffic before,
during and after. Only behaviour (rate, address use) separates them, and the truth lives only in
the truth file, never in the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from streams.sim.chat import SYSTEM_PROMPT as SYSTEM_PROMPT
from streams.sim.chat import Chat
from streams.sim.events import EventRenderer
from streams.sim.models import (
    CREDIT_CAT,
    CREDIT_DRIFT_CAT,
    CREDIT_NUM,
    FRAUD_CAT,
    FRAUD_NUM,
    Tabular,
    Vector,
    draw_code,
)
from streams.sim.population import CHAT, CREDIT, population

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

SCENARIOS: dict[str, str] = {
    "default": "4 models, ~570 callers; rate spikes on a light key, a heavy key and one IP; "
    "prediction drift on credit-risk",
    "bench": "one tabular model, 500 steady callers, ~500-byte events, no incidents",
    "quiet": "the default population and models, benign only (false-alarm checks)",
}
DEFAULT_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SLICE_MS = 10_000
_MIN_SPAN_MS = 30 * 60_000
_CHUNK_EVENTS = 8_192
_FLUSH_MS = 1_500


@dataclass(frozen=True)
class Incident:
    """One injected incident. ``event_count`` counts the events whose field for
    ``entity_type`` (``api_key_id``, ``client_ip`` or ``model_id``) equals ``entity`` and whose
    ``start_ts_ms <= ts < end_ts_ms``, the attacker's background traffic in the window included."""

    incident_id: str
    kind: str
    detector: str
    entity_type: str
    entity: str
    model_id: str
    start_ts_ms: int
    end_ts_ms: int
    event_count: int
    description: str


@dataclass(frozen=True)
class Truth:
    """What the simulator injected; complete before the first event is produced."""

    scenario: str
    seed: int
    events: int
    incidents: list[Incident]
    benign_callers: list[str]
    attackers: list[str]
    models: list[dict[str, Any]]
    start_ts_ms: int
    end_ts_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)


# ------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class _Surge:
    callers: I64
    s0: int  # first slice
    s1: int  # end slice (exclusive)
    mult: float
    ip: int  # address the callers all use during the surge, -1 to keep their own


class _Run:
    """One (scenario, events, seed): the plan, the per-slice schedule and the rendering.

    Slice ``s`` always gets the same events: its counts, callers, models and addresses come
    from a generator seeded by (seed, s), so the truth pass and the rendering pass agree."""

    def __init__(self, scenario: str, events: int, seed: int, start_ms: int) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; expected one of {sorted(SCENARIOS)}")
        if events < 0:
            raise ValueError(f"events must be >= 0, got {events}")
        self.scenario, self.events, self.seed, self.start_ms = scenario, events, seed, start_ms
        bench = scenario == "bench"
        self.fraud = Tabular(
            "fraud-scorer", "2025.11.3", FRAUD_NUM, FRAUD_CAT, ("legit", "fraud"), (0, -5), 11.0
        )
        if bench:
            num = tuple((f"f{j:02d}", *f[1:]) for j, f in enumerate(FRAUD_NUM))
            bench_model = Tabular(
                "bench-tabular", "1.0.0", num, (), ("neg", "pos"), (0, -2), 4.0, 4
            )
            self.models: list[Any] = [bench_model]
        else:
            credit = Tabular(
                "credit-risk", "7.1.0", CREDIT_NUM, CREDIT_CAT, ("low", "medium", "high"),
                (1.0, 0.3, -0.8), 24.0, drift_cats=CREDIT_DRIFT_CAT,
            )  # fmt: skip
            self.models = [self.fraud, credit, Vector(), Chat()]
        self.pop = population(scenario, seed)
        events_per_s = 200.0 if bench else 100_000 / 7_200
        span_ms = max(_MIN_SPAN_MS, int(events * 1000 / events_per_s))
        self.n_slices = -(-span_ms // SLICE_MS)
        self.end_ms = start_ms + self.n_slices * SLICE_MS
        self.surges: list[_Surge] = []
        self.drift_slice, self.drift_model = self.n_slices, -1
        self.plan: list[tuple[str, str, int, int, int, float]] = []
        if scenario == "default":
            self._plan_incidents()
        lam = np.concatenate(
            [
                self._intensity(s, min(s + 1024, self.n_slices)).sum(1)
                for s in range(0, self.n_slices, 1024)
            ]
        )
        rng = np.random.default_rng([seed, 0x51CE])
        self.counts = rng.multinomial(events, lam / lam.sum()).astype(np.int64)

    def _plan_incidents(self) -> None:
        n, a = self.n_slices, self.pop.attacker
        rng = np.random.default_rng([self.seed, 0x1AC1])
        dur = min(60, max(6, round(0.12 * n)))
        s_key, s_heavy, s_ip = round(0.30 * n), round(0.62 * n), round(0.80 * n)
        self.drift_slice, self.drift_model = round(0.55 * n), CREDIT
        m_key, m_heavy = float(rng.uniform(20, 50)), float(rng.uniform(5, 10))
        self.surges = [
            _Surge(a["stolen_key"], s_key, s_key + dur, m_key, -1),
            _Surge(a["heavy_key"], s_heavy, s_heavy + dur, m_heavy, -1),
            _Surge(a["sybil"], s_ip, s_ip + dur, 3.0, self.pop.sybil_ip),
        ]
        # (kind, entity field, entity index, first slice, end slice, multiplier)
        self.plan = [
            ("rate_spike_key", "caller", int(a["stolen_key"][0]), s_key, s_key + dur, m_key),
            ("rate_spike_key", "caller", int(a["heavy_key"][0]), s_heavy, s_heavy + dur, m_heavy),
            ("rate_spike_ip", "ip", self.pop.sybil_ip, s_ip, s_ip + dur, 3.0),
            ("prediction_drift", "model", CREDIT, self.drift_slice, n, 1.0),
        ]

    def _intensity(self, s0: int, s1: int) -> F64:
        """Expected events per (slice, caller) for slices ``s0 <= s < s1``, up to a constant."""
        p = self.pop
        s = np.arange(s0, s1)[:, None]
        k = (s - p.phase) % p.period
        mod = np.where(p.pattern == 1, np.where(k == 0, p.period, 0.0), 1.0)
        mod = np.where(p.pattern == 2, np.where(k < p.duty * p.period, 1.0 / p.duty, 0.0), mod)
        trend = 1.0 + 0.1 * np.sin(2 * np.pi * s * SLICE_MS / 10_800_000 + 0.7)
        lam: F64 = p.rate * mod * trend
        for sg in self.surges:
            lo, hi = max(s0, sg.s0), min(s1, sg.s1)
            if lo < hi:
                lam[lo - s0 : hi - s0, sg.callers] *= sg.mult
        return lam

    def schedule(self, s: int) -> tuple[I64, I64, I64, I64]:
        """(ts_ms, caller, model, ip) of slice ``s``, in emission order."""
        p, n = self.pop, int(self.counts[s])
        rng = np.random.default_rng([self.seed, 0x5C4E, s])
        lam = self._intensity(s, s + 1)[0]
        caller = np.repeat(np.arange(p.n), rng.multinomial(n, lam / lam.sum()))
        u = rng.random((3, n))
        ts = self.start_ms + s * SLICE_MS + (u[0] * p.width[caller] * SLICE_MS).astype(np.int64)
        model = draw_code(u[1], p.model_w[caller])
        ip = p.ip_idx[caller, (u[2][:, None] > p.ip_cum[caller, :-1]).sum(axis=1)]
        for sg in self.surges:
            if sg.ip >= 0 and sg.s0 <= s < sg.s1:
                ip[np.isin(caller, sg.callers)] = sg.ip
        emit = (
            np.where(model == CHAT, -(-ts // _FLUSH_MS) * _FLUSH_MS, ts)
            if len(self.models) > CHAT
            else ts
        )
        order = np.argsort(emit, kind="stable")
        return ts[order], caller[order], model[order], ip[order]

    def truth(self) -> Truth:
        """One schedule pass (no rendering) to count the events of every incident."""
        inside = np.zeros(len(self.plan), np.int64)
        before = np.zeros(len(self.plan), np.int64)
        for s in range(self.n_slices):
            if not self.plan or not self.counts[s]:
                continue
            _, caller, model, ip = self.schedule(s)
            column = {"caller": caller, "model": model, "ip": ip}
            for k, (_, field, entity, s0, s1, _m) in enumerate(self.plan):
                hits = int(np.count_nonzero(column[field] == entity))
                if s0 <= s < s1:
                    inside[k] += hits
                elif s < s0:
                    before[k] += hits
        p = self.pop
        attackers: list[str] = []
        if self.scenario == "default":
            attackers = sorted(p.keys[np.concatenate(list(p.attacker.values()))].tolist())
        incidents = [
            self._incident(k, int(inside[k]), int(before[k])) for k in range(len(self.plan))
        ]
        return Truth(
            scenario=self.scenario,
            seed=self.seed,
            events=self.events,
            incidents=incidents,
            benign_callers=sorted(set(p.keys.tolist()) - set(attackers)),
            attackers=attackers,
            models=[m.describe() for m in self.models],
            start_ts_ms=self.start_ms,
            end_ts_ms=self.end_ms,
        )

    def _incident(self, k: int, inside: int, before: int) -> Incident:
        kind, field, entity, s0, s1, mult = self.plan[k]
        base, peak = before / max(s0, 1) * 6, inside / (s1 - s0) * 6  # events per minute
        rates = f"{base:.1f} events/min before, {peak:.1f} during"
        minutes = (s1 - s0) * SLICE_MS // 60_000
        if field == "model":
            name = model = self.models[entity].model_id
            detector, entity_type = "drift.psi", "model"
            text = (
                f"{name} applicant mix shifts (thin-file card and overdraft applicants from a new "
                "partner channel): five inputs move by 0.5 sd, the product and employment mix "
                "changes, and the share of 'high' predictions rises until the end"
            )
        elif field == "ip":
            name, model = str(self.pop.ip_names[entity]), "fraud-scorer"
            detector, entity_type = "abuse.rate_spike", "client_ip"
            text = (
                f"{len(self.pop.attacker['sybil'])} light keys send all their {model} traffic "
                f"from {name} for {minutes} min, each at {mult:.0f}x its usual rate ({rates} "
                "from this address)"
            )
        else:
            name = str(self.pop.keys[entity])
            model = self.models[int(np.argmax(self.pop.model_w[entity]))].model_id
            detector, entity_type = "abuse.rate_spike", "api_key"
            role = "light key (stolen: LLM cost abuse)" if mult > 12 else "heavy key (scraping)"
            text = f"{role} {name} on {model} goes {mult:.1f}x for {minutes} min ({rates})"
        start, end = self.start_ms + s0 * SLICE_MS, self.start_ms + s1 * SLICE_MS
        return Incident(
            f"sim-{k + 1}", kind, detector, entity_type, name, model, start, end, inside, text
        )

    def lines(self) -> Iterator[bytes]:
        """Every event as one JSON line (no newline), rendered a chunk of slices at a time."""
        drift_ms = self.start_ms + self.drift_slice * SLICE_MS
        renderer = EventRenderer(self.pop, self.models, self.seed, drift_ms, self.drift_model)
        first, parts, size = 0, [], 0
        for s in range(self.n_slices):
            if self.counts[s]:
                parts.append(self.schedule(s))
                size += int(self.counts[s])
            if size >= _CHUNK_EVENTS or (s == self.n_slices - 1 and size):
                cols = [np.concatenate(c) for c in zip(*parts, strict=True)]
                yield from renderer.render(first, *cols)
                first, parts, size = s + 1, [], 0


# --------------------------------------------------------------------------------- public API


def simulate(
    scenario: str, events: int, seed: int, start_ms: int = DEFAULT_START_MS
) -> tuple[Iterator[bytes], Truth]:
    """``events`` JSON lines (bytes, no newline) of ``scenario`` and the truth, built up front.

    The same (scenario, events, seed, start_ms) gives the same bytes. Lines come in emission
    order: ``ts`` never runs more than 1.5 s behind the largest ``ts`` before it.

    >>> lines, truth = simulate("default", 2_000, seed=1)
    >>> sum(1 for _ in lines), sorted({i.kind for i in truth.incidents})
    (2000, ['prediction_drift', 'rate_spike_ip', 'rate_spike_key'])
    """
    run = _Run(scenario, events, seed, start_ms)
    return run.lines(), run.truth()


def write(
    scenario: str,
    events: int,
    seed: int,
    out: Path,
    truth_out: Path | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    start_ms: int = DEFAULT_START_MS,
) -> Truth:
    """Write the events to ``out`` (JSONL) and the truth to ``truth_out`` (default
    ``out.with_suffix(".truth.json")``); ``progress`` gets the number of lines written so far."""
    lines, truth = simulate(scenario, events, seed, start_ms)
    written, buf = 0, []
    with out.open("wb") as f:
        for line in lines:
            buf.append(line)
            if len(buf) == _CHUNK_EVENTS:
                f.write(b"\n".join(buf) + b"\n")
                written, buf = written + len(buf), []
                if progress is not None:
                    progress(written)
        if buf:
            f.write(b"\n".join(buf) + b"\n")
            written += len(buf)
    if progress is not None:
        progress(written)
    (truth_out or out.with_suffix(".truth.json")).write_bytes(truth.to_json())
    return truth
