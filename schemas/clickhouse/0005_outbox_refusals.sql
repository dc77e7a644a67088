-- inferwatch store, version 5: what a receiver answered, and timeouts, per outbox row.
-- response_status: the receiver's last HTTP status (0: none, e.g. connection refused or no
-- answer in time); last_error keeps it with a bounded, escaped excerpt of the answer.
-- timeouts: attempts that got no answer in time. The receiver may have each of them, so a
-- delivery is refused (delivered = 2) after the route's max_timeouts, not retried for ever.
-- Rows written before this version read 0 for both.

ALTER TABLE outbox ADD COLUMN IF NOT EXISTS response_status UInt16 DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS timeouts UInt32 DEFAULT 0;
