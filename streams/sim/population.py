"""The simulator's callers: classes and rates, tenants, user-agent and address pools, attackers.

Attackers are drawn by the same code as benign callers of their class; only their role (kept in
``Population.attacker``) and later behaviour set them apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from streams.sim.models import draw_code

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Objs = npt.NDArray[np.object_]

_PUBLIC_POOLS = ("198.51.100", "203.0.113", "192.0.2", "100.64.12", "100.64.13")
_INTERNAL_POOLS = ("10.12.40", "10.12.41", "172.20.5")
_APP_UAS = (
    "NorthbankApp/7.4.1 (iPhone; iOS 18.2)",
    "NorthbankApp/7.4.0 (Android 15; SM-S921B)",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "axios/1.7.9",
    "inferwatch-sdk/0.1.0 python/3.12",
)
_SERVER_UAS = (
    "python-requests/2.32.3",
    "Go-http-client/2.0",
    "Java/17.0.13",
    "aiohttp/3.11.11",
    "inferwatch-sdk/0.1.0 python/3.12",
    "Apache-HttpClient/4.5.14 (Java/11.0.25)",
)
_ODD_UAS = ("curl/8.5.0", "PostmanRuntime/7.43.0", "libwww-perl/6.77", "-", "batch-runner/0.0.1")
_APP_TENANTS = ("retail-mobile", "retail-web", "cards", "contact-centre", "sme-banking", "wealth")
_PARTNER_TENANTS = ("partner-paylane", "partner-finlo", "partner-quidpay", "broker-portal")
_SERVICE_TENANTS = ("fraud-ops", "lending-ops", "batch-platform", "data-science", "kyc-ops")
# (class, benign count) of the default population; model mix is over the default models
_CLASSES = (("light", 470), ("medium", 50), ("heavy", 8), ("burst", 6), ("gappy", 16))
_APP_MIX = np.array([0.35, 0.25, 0.15, 0.25])
_BATCH_MIX = np.array([0.45, 0.35, 0.2, 0.0])
FRAUD, CREDIT, DOC, CHAT = 0, 1, 2, 3


@dataclass
class _Caller:
    cls: str
    rate: float  # events per second before modulation
    tenant: str
    ua: str
    ips: list[str]
    ip_w: list[float]
    model_w: list[float]
    pattern: int = 0  # 0 steady, 1 one burst per period, 2 on for a duty fraction of the period
    period: int = 1  # slices
    phase: int = 0
    duty: float = 1.0
    width: float = 1.0  # share of a slice its events spread over
    session_ms: int = 0
    messages: bool = False


def _ip(rng: np.random.Generator, pools: tuple[str, ...]) -> str:
    return f"{pools[int(rng.integers(len(pools)))]}.{int(rng.integers(1, 255))}"


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _draw_caller(rng: np.random.Generator, cls: str, model: int = -1) -> _Caller:
    """One caller of ``cls``; benign callers and attackers alike come from here."""
    app = cls in ("light", "gappy") or (cls == "medium" and rng.random() < 0.5)
    mix = _APP_MIX if cls in ("light", "medium", "gappy") else _BATCH_MIX
    first = model if model >= 0 else int(draw_code(rng.random(1), mix)[0])
    model_w = [0.0] * len(mix)
    model_w[first] = 1.0
    if model < 0 and app and rng.random() < 0.2:
        model_w[first] = 0.7
        model_w[int(draw_code(rng.random(1), mix)[0])] += 0.3
    if app:
        n_ips = int(draw_code(rng.random(1), np.array([0.5, 0.35, 0.15]))[0]) + 1
        pools = [_PUBLIC_POOLS if rng.random() < 0.85 else _INTERNAL_POOLS for _ in range(n_ips)]
        ips = [_ip(rng, p) for p in pools]
        ip_w = list(np.sort(rng.dirichlet(np.full(n_ips, 2.0)))[::-1])
        tenant = _pick(rng, _APP_TENANTS if rng.random() < 0.7 else _PARTNER_TENANTS)
        ua = _pick(rng, _APP_UAS)
        minutes = rng.uniform(5, 20) if first == CHAT else rng.uniform(10, 40)
        session_ms = int(minutes * 60_000)
    else:
        ips, ip_w = [_ip(rng, _INTERNAL_POOLS)], [1.0]
        tenant, ua, session_ms = _pick(rng, _SERVICE_TENANTS), _pick(rng, _SERVER_UAS), 0
    c = _Caller(cls, 0.0, tenant, ua, ips, ip_w, model_w, session_ms=session_ms)
    c.messages = bool(rng.random() < 0.5)
    if cls == "light":
        c.rate = float(np.clip(rng.lognormal(np.log(0.008), 0.8), 0.0015, 0.06))
    elif cls == "medium":
        c.rate = float(rng.lognormal(np.log(0.06), 0.4))
    elif cls == "heavy":
        c.rate = float(rng.uniform(0.35, 0.7))
    elif cls == "burst":  # a cron job: one 5 s burst every 5, 10 or 15 minutes
        c.rate, c.pattern, c.width = float(rng.uniform(0.03, 0.08)), 1, 0.5
        c.period = int(rng.choice([30, 60, 90]))
    else:  # gappy: on for 15-40% of a 10-30 minute cycle, silent otherwise
        c.rate, c.pattern = float(rng.uniform(0.01, 0.04)), 2
        c.period, c.duty = int(rng.integers(60, 181)), float(rng.uniform(0.15, 0.4))
    c.phase = int(rng.integers(c.period))
    return c


@dataclass(frozen=True)
class Population:
    keys: Objs
    tenant: Objs
    ua: Objs
    ip_names: Objs
    rate: F64
    pattern: I64
    period: I64
    phase: I64
    duty: F64
    width: F64
    model_w: F64  # (n, models) model mix
    ip_idx: I64  # (n, 3) candidate addresses, index into ip_names
    ip_cum: F64  # (n, 3)
    session_ms: I64
    messages: Bools
    salt: npt.NDArray[np.uint64]
    attacker: dict[str, I64]  # role -> caller indices
    sybil_ip: int  # index into ip_names, -1 if none

    @property
    def n(self) -> int:
        return int(self.rate.shape[0])


def _default_callers(rng: np.random.Generator) -> tuple[list[_Caller], dict[str, list[int]], str]:
    benign = [_draw_caller(rng, cls) for cls, count in _CLASSES for _ in range(count)]
    light = [i for i, c in enumerate(benign) if c.cls == "light"]
    nats = [_ip(rng, _PUBLIC_POOLS) for _ in range(3)]
    for k, i in enumerate(rng.choice(light, 45, replace=False).tolist()):
        benign[i].ips, benign[i].ip_w = [nats[k % 3]], [1.0]  # branch offices behind NAT
    app = [i for i, c in enumerate(benign) if c.cls in ("light", "medium")]
    for k, i in enumerate(rng.choice(app, 12, replace=False).tolist()):
        benign[i].ua = _ODD_UAS[k % len(_ODD_UAS)]
    used = {ip for c in benign for ip in c.ips}
    sybil_ip = _ip(rng, _PUBLIC_POOLS)
    while sybil_ip in used:
        sybil_ip = _ip(rng, _PUBLIC_POOLS)
    stolen = _draw_caller(rng, "light", CHAT)
    stolen.rate = float(rng.uniform(0.01, 0.02))
    scraper = _draw_caller(rng, "heavy", FRAUD)
    scraper.rate = float(rng.uniform(0.4, 0.6))
    sybils = [_draw_caller(rng, "light", FRAUD) for _ in range(20)]
    for s in sybils:  # the attacker's own address carries a little of their traffic all along
        s.rate = float(rng.uniform(0.006, 0.015))
        own = np.asarray(s.ip_w[:2])
        s.ips, s.ip_w = [*s.ips[:2], sybil_ip], [*(0.85 * own / own.sum()).tolist(), 0.15]
    everyone = [*benign, stolen, scraper, *sybils]
    order = rng.permutation(len(everyone))
    where = np.argsort(order)  # new position of each caller
    n = len(benign)
    roles = {
        "stolen_key": [int(where[n])],
        "heavy_key": [int(where[n + 1])],
        "sybil": sorted(int(where[n + 2 + k]) for k in range(20)),
    }
    return [everyone[i] for i in order.tolist()], roles, sybil_ip


def _bench_callers(rng: np.random.Generator) -> list[_Caller]:
    out = []
    for _ in range(500):
        c = _draw_caller(rng, "medium", 0)
        c.rate, c.session_ms, c.model_w = float(rng.lognormal(0.0, 1.0)), 0, [1.0]
        out.append(c)
    return out


def population(scenario: str, seed: int) -> Population:
    rng = np.random.default_rng([seed, 0x5EED, scenario == "bench"])
    if scenario == "bench":
        callers, sybil_ip = _bench_callers(rng), ""
        roles: dict[str, list[int]] = {}
    else:  # quiet has the same callers as default; its would-be attackers simply behave
        callers, roles, sybil_ip = _default_callers(rng)
    names = sorted({ip for c in callers for ip in c.ips})
    slot = {ip: i for i, ip in enumerate(names)}
    ip_idx = np.array([[slot[c.ips[min(j, len(c.ips) - 1)]] for j in range(3)] for c in callers])
    ip_cum = np.array([np.cumsum(np.pad(c.ip_w, (0, 3 - len(c.ip_w)))) for c in callers])
    keys: set[str] = set()
    while len(keys) < len(callers):
        keys.add(f"key_{int(rng.integers(1 << 48)):012x}")

    def attr(name: str, dtype: Any = None) -> Any:
        return np.array([getattr(c, name) for c in callers], dtype=dtype)

    def obj(name: str) -> Objs:
        return np.array([getattr(c, name) for c in callers], dtype=object)

    return Population(
        keys=np.array(sorted(keys), dtype=object)[rng.permutation(len(callers))],
        tenant=obj("tenant"),
        ua=obj("ua"),
        ip_names=np.array(names, dtype=object),
        rate=attr("rate").astype(np.float64),
        pattern=attr("pattern").astype(np.int64),
        period=attr("period").astype(np.int64),
        phase=attr("phase").astype(np.int64),
        duty=attr("duty").astype(np.float64),
        width=attr("width").astype(np.float64),
        model_w=attr("model_w").astype(np.float64),
        ip_idx=ip_idx.astype(np.int64),
        ip_cum=ip_cum,
        session_ms=attr("session_ms").astype(np.int64),
        messages=attr("messages").astype(np.bool_),
        salt=rng.integers(0, 1 << 63, len(callers), dtype=np.uint64),
        attacker={k: np.asarray(v, dtype=np.int64) for k, v in roles.items()},
        sybil_ip=slot.get(sybil_ip, -1),
    )
