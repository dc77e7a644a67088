-- inferwatch store, version 7: an operator's reference beats an automatic one whatever their seq.
-- model_references kept one row per (model_id, model_version) at merge, the largest seq: an
-- automatic reference written after an operator's (a worker that did not load it yet) replaced it.
-- automatic = 1 marks the worker's own references (built from a version's first events); the
-- sorting key keeps them apart from the operator's (`reference set`, automatic = 0), and reads take
-- the operator's first, then the newest (streams/checkpoint.py, REFERENCE_PRECEDENCE). Rows stored
-- before this version are re-marked from their source column.

ALTER TABLE model_references ADD COLUMN IF NOT EXISTS automatic UInt8,
    MODIFY ORDER BY (model_id, model_version, automatic);
INSERT INTO model_references (model_id, model_version, n_events, source, data, created_at, seq,
    automatic)
    SELECT model_id, model_version, n_events, source, data, created_at, seq, 1
    FROM model_references WHERE source = 'auto' AND automatic = 0;
DELETE FROM model_references WHERE source = 'auto' AND automatic = 0
