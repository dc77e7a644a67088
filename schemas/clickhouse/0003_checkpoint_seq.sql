-- inferwatch store, version 3: rows that depend on detector decisions carry the checkpoint that
-- wrote them (ckpt_seq). A worker killed after its sinks flushed and before its positions were
-- saved leaves rows of a checkpoint that never completed; its replay may decide differently (the
-- batches it reads are cut differently), so at start those rows are deleted, like the outbox's.
-- Events and dead letters need no such column: a replay writes the same rows for them.

ALTER TABLE alerts ADD COLUMN IF NOT EXISTS ckpt_seq UInt64 DEFAULT 0;
ALTER TABLE findings ADD COLUMN IF NOT EXISTS ckpt_seq UInt64 DEFAULT 0;
ALTER TABLE window_metrics ADD COLUMN IF NOT EXISTS ckpt_seq UInt64 DEFAULT 0
