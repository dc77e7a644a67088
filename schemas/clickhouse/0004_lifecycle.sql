-- inferwatch store, version 4: the analyst's silences and allow-list (issue 5). Each change (an
-- expiry) is a new row version; reads use FINAL. Times are UTC; a row applies while
-- starts_at <= now < ends_at. matchers are "label=value" strings (=, !=, =~, !~).

CREATE TABLE IF NOT EXISTS silences (
    silence_id String,
    matchers Array(String),
    starts_at DateTime64(3, 'UTC'),
    ends_at DateTime64(3, 'UTC'),
    author String,
    comment String,
    created_at DateTime64(3, 'UTC'),
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY silence_id;

CREATE TABLE IF NOT EXISTS allow_list (
    allow_id String,
    entity_type LowCardinality(String),
    entity String,
    model_id String,
    ends_at DateTime64(3, 'UTC'),
    author String,
    reason String,
    created_at DateTime64(3, 'UTC'),
    version UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY allow_id;
