-- The event log; see the Postgres migration for what each column means.
CREATE TABLE rt_topics (
    name       TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    low_seq    INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE rt_events (
    topic           TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    type            TEXT NOT NULL,
    data            TEXT NOT NULL,
    time_us         INTEGER NOT NULL, -- commit time, microseconds since the Unix epoch
    idempotency_key TEXT,
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;

CREATE UNIQUE INDEX rt_events_idempotency ON rt_events (topic, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
