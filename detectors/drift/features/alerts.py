"""Alerts and window metrics of ``drift.features`` from the engine's changes (see
:mod:`detectors.drift.features.detector`): the ranking of drifted columns with reference vs current
quantiles."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from detectors.base import AlertChange, Severity, WindowMetric
from detectors.drift import stats as ds
from detectors.drift.bins import bin_quantiles
from detectors.drift.features.windows import Change, Settings

TOP = 10  # drifted columns ranked in an alert


def window_metrics(track: Any, changes: list[Change], detector: str) -> list[WindowMetric]:
    """Per whole window length: each column's KS (numeric) or JS distance (categorical),
    named ``<column>@<version>``, and how many columns a test rejected at that hop. All the
    windows of a batch at once: one array per statistic, then one row per (window, column)."""
    if not changes:
        return []
    lay = track.layout
    b = lay.bins
    window = np.stack([c.window[:, :b] for c in changes])
    values = np.round(np.stack([c.ks for c in changes]), 9)
    cat = np.flatnonzero(lay.categorical)
    if cat.size:
        values[:, cat] = np.round(ds.js_distance(lay.counts[cat, :b], window[:, cat]), 9)
    counts = window.sum(axis=2)
    model, version = track.model_id, track.version
    label = f"@{version}" if version else ""
    names = [f"{name}{label}" for name in lay.names]
    kinds = ["drift_js" if k else "drift_ks" for k in lay.categorical.tolist()]
    out = []
    for c, vs, ns in zip(changes, values.tolist(), counts.tolist(), strict=True):
        start, end = c.first_ts_ms, c.end_ts_ms + 1
        out += [
            WindowMetric(model, kind, start, end, v, name, n, detector)
            for name, kind, v, n in zip(names, kinds, vs, ns, strict=True)
            if n > 0
        ]
        rejected, top = float(c.rejected.sum()), max(ns, default=0)
        kind = "drift_columns_rejected"
        out.append(WindowMetric(model, kind, start, end, rejected, label, top, detector))
    return out


def rank_columns(track: Any, c: Change) -> list[dict[str, Any]]:
    lay = track.layout
    b = lay.bins
    idx = np.flatnonzero(c.rejected)
    idx = idx[np.lexsort((-np.abs(c.d_window[idx]), c.p_min[idx]))][:TOP]
    ref, cur = lay.counts[idx, :b], c.window[idx, :b][None]
    psi = ds.psi_rows(ref, cur)[0]
    js = ds.js_distance(ref, cur[0])
    ws = ds.wasserstein(ref, cur[0], lay.centers[idx], lay.value_sd[idx])
    q_ref = bin_quantiles(ref, lay.bounds[idx])
    q_cur = bin_quantiles(cur[0], lay.bounds[idx])
    out = []
    for i, j in enumerate(idx.tolist()):
        numeric = not bool(lay.categorical[j])
        item: dict[str, Any] = {
            "column": lay.names[j],
            "kind": "numeric" if numeric else "categorical",
            "tests": list(c.families[j]),
            "p_value": float(c.p_min[j]),
            "psi": round(float(psi[i]), 6),
            "js": round(float(js[i]), 6),
            "events": int(c.window[j, :b].sum()),
        }
        if numeric:
            item.update(
                shift_sd=round(float(c.d_window[j]), 4),
                last_hop_shift_sd=round(float(c.d_hop[j]), 4),
                ks=round(float(c.ks[j]), 6),
                wasserstein_sd=round(float(ws[i]), 6),
                reference_quantiles=_quantiles(q_ref[i]),
                current_quantiles=_quantiles(q_cur[i]),
            )
        else:
            item["reference_proportions"] = _props(ref[i], lay.widths[j])
            item["current_proportions"] = _props(cur[0, i], lay.widths[j])
        out.append(item)
    return out


def alert(track: Any, c: Change, s: Settings) -> AlertChange:
    ranked = rank_columns(track, c) if c.status == "firing" else []
    p = float(np.min(c.p_min)) if c.p_min.size else 1.0
    score = -math.log10(max(p, 1e-300))
    columns = ", ".join(r["column"] for r in ranked[:3])
    version = f" version {track.version}" if track.version else ""
    drifted = int(c.rejected.sum())
    if c.status == "firing":
        watched = any(r["column"].startswith(("prediction:", "confidence")) for r in ranked)
        track.episode = {
            "start": c.end_ts_ms,
            "first": c.first_ts_ms,
            "severity": "high" if drifted >= 3 or watched else "medium",
        }
    ep = track.episode or {"start": c.end_ts_ms, "first": c.first_ts_ms, "severity": "medium"}
    severity: Severity = "high" if ep["severity"] == "high" else "medium"
    if c.status == "firing":
        summary = (
            f"{drifted} of {len(track.layout.names)} columns of {track.model_id}{version} "
            f"drifted from the reference ({columns}) over the last {int(c.window[0].sum())} "
            "events"
        )
    else:
        summary = f"No drift on {track.model_id}{version} for {s.clear_hops} hops"
    evidence = {
        "model_version": track.version,
        "drifted": ranked,
        "drifted_count": drifted,
        "columns": len(track.layout.names),
        "alpha_per_window": s.alpha,
        "bh_level_per_family_hop": s.level,
        "floors": {"location_sd": s.location_floor, "ks": s.ks_floor, "js": s.js_floor},
        "hop": c.hop,
        "quantile_method": "interpolated within reference-quantile bins",
    }
    if c.status != "firing":
        track.episode = {}
    return AlertChange(
        entity_type="model",
        entity=track.model_id,
        model_id=track.model_id,
        tenant="",
        status="firing" if c.status == "firing" else "resolved",
        ts_ms=ep["start"],
        resolved_ms=None if c.status == "firing" else c.end_ts_ms,
        episode_start_ms=ep["start"],
        first_seen_ms=ep["first"],
        last_seen_ms=c.end_ts_ms,
        score=score,
        threshold=-math.log10(s.level),
        severity=severity,
        title=f"Feature drift on {track.model_id}{version}",
        summary=summary,
        evidence=evidence,
        event_count=int(c.window[0].sum()),
        sample_event_ids=(),
    )


def _quantiles(q: npt.NDArray[np.float64]) -> dict[str, float]:
    return {f"p{p}": round(float(v), 6) for p, v in zip((10, 50, 90), q.tolist(), strict=True)}


def _props(counts: npt.NDArray[np.int64], width: int) -> list[float]:
    c = counts[:width]
    return [round(float(v), 6) for v in c / max(int(c.sum()), 1)]
