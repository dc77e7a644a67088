"""pipeline.detection_blind through the worker's pipeline: a model with traffic and no reference
past a bound is an alert naming what is off, resolved once the reference exists."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import AlertChange
from detectors.drift.features.detector import FeatureDrift
from detectors.drift.psi.detector import PSI
from detectors.extraction.query_pattern.detector import QueryPattern
from detectors.models.reference_store import ReferenceStore
from detectors.models.routing import FeatureIndex, route
from detectors.pipeline.detection_blind import DetectionBlind
from detectors.privacy.query_probing.detector import QueryProbing
from schemas.batch import Decoded, EventBatch
from streams.worker.pipeline import Pipeline
from tests.support.conformance import T0_MS, make_batch


def pipeline(blind: DetectionBlind, with_users: bool = True) -> Pipeline:
    users = [FeatureDrift(), PSI(), QueryPattern(), QueryProbing()] if with_users else []
    return Pipeline([blind, *users], references=ReferenceStore())


def calls(callers: list[str], t0_ms: int = T0_MS, step_ms: int = 100) -> EventBatch:
    n = len(callers)
    rng = np.random.default_rng(n)
    p = rng.random(n)
    return make_batch(
        [t0_ms + i * step_ms for i in range(n)],
        callers,
        model_id=["fraud"] * n,
        features=rng.normal(size=(n, 4)),
        scores=np.column_stack([1 - p, p]),
        event_id=[f"e{t0_ms + i * step_ms}" for i in range(n)],
    )


def blind_alerts(p: Pipeline, batches: list[EventBatch]) -> list[AlertChange]:
    out = []
    for b in batches:
        result = p.run(b, Decoded(b, np.zeros(0, np.int64), ()))
        out += [a for det, a in result.alerts if det.name == "pipeline.detection_blind"]
    return out


def flood(n: int, every: int = 50) -> list[str]:
    """One caller floods; another sends one call in ``every``."""
    return ["key_app" if i % every == 0 else "key_flood" for i in range(n)]


def test_detection_blind_names_what_is_off_and_resolves_when_the_reference_freezes() -> None:
    p = pipeline(DetectionBlind(after_events=3_000))
    first = calls(flood(5_000))
    (fired,) = blind_alerts(p, [first.take(np.arange(i, i + 500)) for i in range(0, 5_000, 500)])
    assert (fired.entity_type, fired.entity, fired.status) == ("model", "fraud", "firing")
    assert fired.ts_ms == T0_MS + 2_999 * 100  # the 3,000th event
    off = fired.evidence["detectors_off"]
    assert sorted(off) == [
        "drift.features",
        "drift.psi",
        "extraction.query_pattern",
        "privacy.query_probing",
    ]
    assert off["drift.psi"].startswith("off") and off["extraction.query_pattern"].startswith(
        "partly off"
    )
    ref = fired.evidence["reference"]
    assert ref["capped_callers"] == ["key_flood"] and ref["allowed_share"] == 0.5
    assert "drift.features, drift.psi off" in fired.summary
    assert "key_flood sent 98%" in fired.summary
    # the slow caller catches up: 1,000 of its events let the reference freeze
    later = calls(["key_app"] * 1_000, T0_MS + 600_000)
    (resolved,) = blind_alerts(p, [later])
    assert resolved.status == "resolved" and resolved.episode_start_ms == fired.episode_start_ms
    frozen = p.references.get("fraud", "")
    assert frozen is not None and resolved.resolved_ms == frozen.last_ts_ms
    assert blind_alerts(p, [calls(flood(500), T0_MS + 900_000)]) == []


@pytest.mark.parametrize("callers", [1, 3, 6])
def test_detection_blind_is_quiet_for_a_model_whose_reference_freezes(callers: int) -> None:
    p = pipeline(DetectionBlind())
    who = [f"svc{i % callers}" for i in range(6_000)]
    parts = [calls(who[i : i + 1_000], T0_MS + i * 100) for i in range(0, 6_000, 1_000)]
    assert blind_alerts(p, parts) == []
    ref = p.references.get("fraud", "")
    assert ref is not None and ref.events_seen == 2_000


def test_detection_blind_fires_on_a_trickle_past_the_time_bound() -> None:
    p = pipeline(DetectionBlind(after_s=6 * 3600, min_events=100))
    trickle = calls(flood(300), step_ms=100_000)  # one call every 100 s: 8 h 20 min
    (fired,) = blind_alerts(p, [trickle])
    assert fired.ts_ms == T0_MS + 216 * 100_000  # the first event 6 h after the first


def test_detection_blind_does_not_depend_on_batch_cuts() -> None:
    whole = calls(flood(4_500))
    seen = set()
    for size in (4_500, 999, 128):
        p = pipeline(DetectionBlind(after_events=3_000))
        parts = [whole.take(np.arange(i, min(i + size, whole.n))) for i in range(0, whole.n, size)]
        (a,) = blind_alerts(p, parts)
        seen.add((a.ts_ms, a.episode_start_ms, a.first_seen_ms, a.event_count))
    assert len(seen) == 1


def test_detection_blind_resolves_on_an_operators_reference_and_survives_a_restart() -> None:
    p = pipeline(DetectionBlind(after_events=3_000))
    (fired,) = blind_alerts(p, [calls(flood(3_500))])
    snap = p.detectors[0].snapshot(p.keyspace)
    again = pipeline(DetectionBlind(after_events=3_000))
    again.detectors[0].restore(snap, again.keyspace)
    again.references.restore(p.references.snapshot())
    rows = calls(["reference-file"] * 500)
    (ref,) = ReferenceStore(n_events=500, max_caller_share=1.0).update(
        rows, route(rows, FeatureIndex())
    )
    again.references.add(ref)
    (resolved,) = blind_alerts(again, [calls(flood(10), T0_MS + 900_000)])
    assert resolved.status == "resolved" and resolved.episode_start_ms == fired.episode_start_ms


def test_detection_blind_says_nothing_without_detectors_that_need_a_reference() -> None:
    p = pipeline(DetectionBlind(after_events=1_000), with_users=False)
    assert blind_alerts(p, [calls(flood(3_000))]) == []


def test_detection_blind_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="expected after_events >= 1"):
        DetectionBlind(after_events=0)
