-- The event log. `rt_topics` holds each topic's counters: `last_seq` is the
-- highest seq assigned (incremented in the same transaction as the insert, so
-- its row lock orders commits per topic); `low_seq` is the lowest seq that may
-- still be read (everything below was pruned by retention).
CREATE TABLE rt_topics (
    name       text PRIMARY KEY,
    last_seq   bigint NOT NULL DEFAULT 0,
    low_seq    bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- `data` is the publisher's JSON kept as text, so it is sent back byte for byte.
CREATE TABLE rt_events (
    topic           text NOT NULL,
    seq             bigint NOT NULL,
    type            text NOT NULL,
    data            text NOT NULL,
    time            timestamptz NOT NULL,
    idempotency_key text,
    PRIMARY KEY (topic, seq)
);

CREATE UNIQUE INDEX rt_events_idempotency ON rt_events (topic, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
