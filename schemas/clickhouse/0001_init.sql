-- inferwatch store, version 1. Every table is idempotent under replay: rows carry deterministic
-- ids (or their source partition and offset) and ReplacingMergeTree drops duplicates; every read
-- the project makes uses FINAL or argMax, so a duplicate is never visible before a merge.
-- {ttl_days} is replaced at migration time: raw events are kept that many days after they were
-- stored (by ingestion time, so replaying last year's file does not delete it on arrival).

CREATE TABLE IF NOT EXISTS events (
    event_id String,
    ts DateTime64(3, 'UTC'),
    model_id LowCardinality(String),
    model_version LowCardinality(String),
    api_key_id String,
    tenant LowCardinality(String),
    client_ip String,
    user_agent String,
    session_id String,
    status Int32,
    latency_ms Float64,
    tokens_in Int64,
    tokens_out Int64,
    features Map(String, Float64),
    categories Map(String, String),
    vector Array(Float32),
    prompt String,
    prompt_hmac String,
    output_label String,
    scores Map(String, Float64),
    output_value Float64,
    output_text String,
    output_text_hmac String,
    finish_reason LowCardinality(String),
    ground_truth String,
    attributes String,
    payload_bytes Int32,
    source_partition Int32,
    source_offset Int64,
    ingested_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (model_id, event_id)
TTL ingested_at + INTERVAL {ttl_days} DAY;

CREATE TABLE IF NOT EXISTS findings (
    finding_id String,
    event_id String,
    ts DateTime64(3, 'UTC'),
    model_id LowCardinality(String),
    api_key_id String,
    client_ip String,
    session_id String,
    detector LowCardinality(String),
    detector_version LowCardinality(String),
    label LowCardinality(String),
    score Float64,
    atlas Array(String),
    owasp Array(String),
    evidence String
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (detector, finding_id);

CREATE TABLE IF NOT EXISTS alerts (
    alert_id String,
    schema_version UInt8,
    ts DateTime64(3, 'UTC'),
    emitted_at DateTime64(3, 'UTC'),
    detector LowCardinality(String),
    detector_version LowCardinality(String),
    severity LowCardinality(String),
    status LowCardinality(String),
    resolved_at Nullable(DateTime64(3, 'UTC')),
    model_id LowCardinality(String),
    tenant LowCardinality(String),
    entity_type LowCardinality(String),
    entity String,
    linked_entities String,
    score Float64,
    threshold Float64,
    title String,
    summary String,
    atlas Array(String),
    owasp Array(String),
    evidence String,
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC'),
    event_count UInt64,
    sample_event_ids Array(String),
    incident_id String,
    runbook String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY alert_id;

CREATE TABLE IF NOT EXISTS window_metrics (
    model_id LowCardinality(String),
    detector LowCardinality(String),
    metric LowCardinality(String),
    feature String,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    value Float64,
    event_count UInt64
) ENGINE = ReplacingMergeTree
ORDER BY (model_id, detector, metric, feature, window_start, window_end);

CREATE TABLE IF NOT EXISTS incidents (
    incident_id String,
    group_key String,
    title String,
    severity LowCardinality(String),
    status LowCardinality(String),
    verdict Nullable(String),
    verdict_by Nullable(String),
    verdict_at Nullable(DateTime64(3, 'UTC')),
    alert_ids Array(String),
    entities Array(String),
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC'),
    assignee Nullable(String),
    notes String,
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY incident_id;

CREATE TABLE IF NOT EXISTS dead_letters (
    source String,
    source_partition Int32,
    source_offset Int64,
    reason LowCardinality(String),
    detail String,
    raw String,
    raw_bytes UInt64,
    gap_to Int64,
    received_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (source, source_partition, source_offset, reason);

CREATE TABLE IF NOT EXISTS detector_state (
    detector LowCardinality(String),
    entity_type LowCardinality(String),
    partition Int32,
    key String,
    data String,
    deleted UInt8,
    seq UInt64
) ENGINE = ReplacingMergeTree(seq)
ORDER BY (detector, entity_type, partition, key);

CREATE TABLE IF NOT EXISTS checkpoints (
    source String,
    partition Int32,
    next_offset Int64,
    max_ts_ms Int64,
    seq UInt64,
    saved_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(seq)
ORDER BY (source, partition);

CREATE TABLE IF NOT EXISTS model_references (
    model_id String,
    model_version String,
    n_events UInt64,
    source LowCardinality(String),
    data String,
    created_at DateTime64(3, 'UTC'),
    seq UInt64
) ENGINE = ReplacingMergeTree(seq)
ORDER BY (model_id, model_version);
