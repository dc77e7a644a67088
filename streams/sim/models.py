"""The simulator's tabular and vector models: feature tables, fixed random softmax scorers.

Scores come from fixed random softmax models of the features, so they follow the inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

_MODEL_SEED = 20_260_101  # deployed models do not change with the traffic seed

# (name, transform, loc, scale, decimals, lo, hi): value = transform(loc + scale * z), z ~ N(0, 1)
_Feat = tuple[str, str, float, float, int, float, float]
_Cat = tuple[str, tuple[str, ...], tuple[float, ...]]
_INF = float("inf")
FRAUD_NUM: tuple[_Feat, ...] = (
    ("amount", "exp", 3.6, 1.1, 2, 0.5, 50_000.0),
    ("amount_vs_avg_ratio", "exp", 0.0, 0.6, 3, 0.0, _INF),
    ("merchant_risk_score", "sig", -1.0, 1.0, 4, 0.0, 1.0),
    ("txn_count_1h", "count", 0.3, 0.8, 0, 0.0, _INF),
    ("txn_count_24h", "count", 1.8, 0.7, 0, 0.0, _INF),
    ("avg_amount_30d", "exp", 3.7, 0.9, 2, 0.0, _INF),
    ("distance_from_home_km", "exp", 2.0, 1.5, 1, 0.0, 20_000.0),
    ("account_age_days", "count", 6.0, 1.0, 0, 0.0, 20_000.0),
    ("device_age_days", "count", 4.0, 1.5, 0, 0.0, 5_000.0),
    ("failed_logins_24h", "count", -1.5, 1.0, 0, 0.0, _INF),
    ("minutes_since_last_txn", "exp", 4.0, 1.5, 1, 0.0, _INF),
    ("card_present", "bin", 0.2, 1.0, 0, 0.0, 1.0),
    ("is_international", "bin", 1.3, 1.0, 0, 0.0, 1.0),
    ("velocity_score", "sig", 0.0, 1.0, 4, 0.0, 1.0),
    ("ip_risk_score", "sig", -1.5, 1.0, 4, 0.0, 1.0),
    ("chargebacks_90d", "count", -2.5, 1.0, 0, 0.0, _INF),
)
FRAUD_CAT: tuple[_Cat, ...] = (
    ("channel", ("web", "mobile_app", "pos", "atm", "phone"), (0.3, 0.35, 0.25, 0.07, 0.03)),
    (
        "merchant_country",
        ("GB", "IE", "FR", "DE", "ES", "NL", "US", "PL", "other"),
        (0.62, 0.06, 0.06, 0.05, 0.05, 0.03, 0.07, 0.03, 0.03),
    ),
)
CREDIT_NUM: tuple[_Feat, ...] = (
    ("annual_income", "exp", 10.5, 0.5, 0, 0.0, _INF),
    ("debt_to_income", "sig", -1.0, 0.7, 3, 0.0, 1.0),
    ("credit_utilisation", "sig", -0.5, 1.0, 3, 0.0, 1.0),
    ("months_at_employer", "count", 3.5, 1.0, 0, 0.0, 600.0),
    ("open_accounts", "count", 1.5, 0.5, 0, 0.0, _INF),
    ("delinquencies_24m", "count", -2.0, 1.2, 0, 0.0, _INF),
    ("loan_amount", "exp", 9.3, 0.9, 0, 500.0, 1_000_000.0),
    ("loan_term_months", "lin", 48.0, 18.0, 0, 6.0, 360.0),
    ("age", "lin", 42.0, 12.0, 0, 18.0, 90.0),
    ("credit_history_years", "lin", 12.0, 7.0, 1, 0.0, 70.0),
    ("hard_inquiries_6m", "count", -0.5, 0.9, 0, 0.0, _INF),
    ("savings_balance", "exp", 8.0, 1.5, 0, 0.0, _INF),
)
CREDIT_CAT: tuple[_Cat, ...] = (
    (
        "product",
        ("mortgage", "personal_loan", "credit_card", "overdraft", "car_finance"),
        (0.2, 0.3, 0.3, 0.1, 0.1),
    ),
    (
        "employment",
        ("employed", "self_employed", "retired", "student", "unemployed"),
        (0.68, 0.14, 0.1, 0.05, 0.03),
    ),
)
# after the drift point a new partner channel brings thin-file card and overdraft applicants
CREDIT_DRIFT_CAT = ((0.08, 0.22, 0.45, 0.2, 0.05), (0.55, 0.14, 0.06, 0.17, 0.08))
_DOC_LABELS = ("statement", "payslip", "id_document", "invoice", "other")
_DOC_PRIOR = np.array([0.35, 0.25, 0.15, 0.15, 0.1])
_DOC_DIM = 32


def draw_code(u: F64, probs: F64) -> I64:
    """Inverse-CDF draw of one category per row: ``probs`` is (k,) or (n, k)."""
    cdf = np.cumsum(probs, axis=-1)[..., :-1]
    code: I64 = (u[:, None] > cdf).sum(axis=1)
    return code


class Tabular:
    """A tabular classifier: a fixed random softmax model of the latent z behind the features.

    Drift moves the latent means of the five features that weigh most on the last class (and
    the categorical mix), so the inputs shift first and the predictions follow."""

    def __init__(
        self,
        model_id: str,
        version: str,
        num: tuple[_Feat, ...],
        cats: tuple[_Cat, ...],
        labels: tuple[str, ...],
        intercept: tuple[float, ...],
        latency_ms: float,
        score_decimals: int = 6,
        drift_cats: tuple[tuple[float, ...], ...] = (),
    ) -> None:
        self.model_id, self.version, self.num, self.cats = model_id, version, num, cats
        self.labels, self.latency_ms, self.epoch_ms = labels, latency_ms, False
        self.score_decimals, self.drift_cats = score_decimals, drift_cats or [c[2] for c in cats]
        rng = np.random.default_rng([_MODEL_SEED, len(num), len(labels)])
        self.w = rng.normal(0.0, 0.6, (len(labels), len(num)))
        self.w[0] = 0.0
        self.cat_w = [rng.normal(0.0, 0.4, (len(labels), len(c[1]))) for c in cats]
        self.b = np.asarray(intercept)
        gap = self.w[-1] - self.w[0]
        top = np.argsort(-np.abs(gap))[:5]
        self.drift_shift = np.zeros(len(num))
        self.drift_shift[top] = 0.5 * np.sign(gap[top])

    def render(self, rng: np.random.Generator, drifted: Bools) -> tuple[list[Any], list[Any]]:
        n = drifted.shape[0]
        z = rng.standard_normal((n, len(self.num)))
        z[drifted] += self.drift_shift
        logits = self.b + z @ self.w.T
        cols = [_transform(z[:, j], *f[1:]) for j, f in enumerate(self.num)]
        u = rng.random((n, len(self.cats)))
        for j, (_, values, probs) in enumerate(self.cats):
            p = np.where(drifted[:, None], self.drift_cats[j], probs) if drifted.any() else probs
            code = draw_code(u[:, j], np.asarray(p))
            logits += self.cat_w[j][:, code].T
            cols.append(np.asarray(values, dtype=object)[code].tolist())
        names = [f[0] for f in self.num] + [c[0] for c in self.cats]
        inputs = [
            {"features": dict(zip(names, row, strict=True))} for row in zip(*cols, strict=True)
        ]
        return inputs, _score_outputs(self.labels, _softmax(logits), self.score_decimals)

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_version": self.version,
            "kind": "tabular",
            "score_type": "probability",
            "labels": list(self.labels),
            "numeric_features": [f[0] for f in self.num],
            "categorical_features": {c[0]: list(c[1]) for c in self.cats},
            "ts_format": "rfc3339",
        }


def _transform(z: F64, tf: str, loc: float, scale: float, dec: int, lo: float, hi: float) -> Any:
    x = loc + scale * z
    if tf == "exp":
        x = np.exp(x)
    elif tf == "sig":
        x = 1.0 / (1.0 + np.exp(-x))
    elif tf == "count":
        x = np.floor(np.exp(x) - 0.5)
    elif tf == "bin":
        x = (z > loc).astype(np.float64)
    x = np.clip(x, lo, hi)
    return np.round(x).astype(np.int64).tolist() if dec == 0 else np.round(x, dec).tolist()


def _softmax(logits: F64) -> F64:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: F64 = e / e.sum(axis=1, keepdims=True)
    return out


def _score_outputs(labels: tuple[str, ...], scores: F64, dec: int) -> list[Any]:
    label = np.asarray(labels, dtype=object)[scores.argmax(axis=1)].tolist()
    rows = zip(*[np.round(scores[:, k], dec).tolist() for k in range(len(labels))], strict=True)
    return [
        {"label": lab, "scores": dict(zip(labels, row, strict=True))}
        for lab, row in zip(label, rows, strict=True)
    ]


class Vector:
    """Document classifier on unit-norm embeddings; emits unnormalised logits."""

    model_id, version, latency_ms, epoch_ms = "doc-embedder-clf", "3.2.0", 38.0, True

    def __init__(self) -> None:
        rng = np.random.default_rng([_MODEL_SEED, _DOC_DIM])
        c = rng.standard_normal((len(_DOC_LABELS), _DOC_DIM))
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.w = 6.0 * self.centroids + rng.normal(0.0, 0.8, self.centroids.shape)
        self.b = rng.normal(-0.5, 0.5, len(_DOC_LABELS))

    def render(self, rng: np.random.Generator, drifted: Bools) -> tuple[list[Any], list[Any]]:
        n = int(drifted.shape[0])
        v = self.centroids[draw_code(rng.random(n), _DOC_PRIOR)]
        v = v + rng.normal(0.0, 0.22, (n, _DOC_DIM))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        inputs = [{"vector": row} for row in np.round(v, 4).tolist()]
        return inputs, _score_outputs(_DOC_LABELS, v @ self.w.T + self.b, 4)

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "model_version": self.version,
            "kind": "vector",
            "score_type": "logit",
            "labels": list(_DOC_LABELS),
            "vector_dim": _DOC_DIM,
            "ts_format": "epoch_ms",
        }
