-- inferwatch store, version 6: message fingerprints, and dead letters kept redacted.
-- events.fingerprint is the keyed fingerprint of the exact bytes an event arrived as (16 hex
-- digits, streams/fingerprint.py). It joins the sorting key after the id, so a second message
-- under a stored event_id that the worker's check no longer reaches is stored beside the first
-- version instead of replacing it; a byte-identical replay has the same key and replaces
-- itself. Rows stored before this version keep an empty fingerprint.
-- dead_letters no longer keep the message: raw is empty unless raw text storage is configured
-- (then at most 64 KiB of it). Instead: the event_id where the message has one, the offending
-- field path, the message's shape with text redacted (structure, bounded), its fingerprint,
-- and for conflicting_event_id the stored version's fingerprint. The way back to the message
-- is the DLQ topic (Kafka) or the file and byte offset (source, source_offset). Dead letters
-- now expire like events, {ttl_days} days after they were received; rows stored before this
-- version keep their raw until then.

ALTER TABLE events ADD COLUMN IF NOT EXISTS fingerprint String,
    MODIFY ORDER BY (model_id, event_id, fingerprint);
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS event_id String DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS field String DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS structure String DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS fingerprint String DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS stored_fingerprint String DEFAULT '';
ALTER TABLE dead_letters MODIFY TTL toDateTime(received_at) + INTERVAL {ttl_days} DAY
