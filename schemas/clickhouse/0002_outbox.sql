-- inferwatch store, version 2: the alert outbox (docs/architecture.md, Delivery).
-- One row per (alert_id, status, route): a firing -> resolved change is a second delivery, a
-- firing update of the same episode is not. Rows are written with the checkpoint that stored the
-- alert (created_seq) and delivered after its positions are saved; rows of a checkpoint that never
-- completed are deleted at start. Each change of a row (an attempt, a delivery) is a new version.
-- delivered: 0 pending, 1 delivered, 2 refused by the route (a permanent error, see last_error).

CREATE TABLE IF NOT EXISTS outbox (
    alert_id String,
    status LowCardinality(String),
    route LowCardinality(String),
    payload String,
    created_seq UInt64,
    delivered UInt8,
    delivered_at Nullable(DateTime64(3, 'UTC')),
    attempts UInt32,
    last_error String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY (route, alert_id, status);
