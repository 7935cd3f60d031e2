-- Web Push delivery (push-dispatcher).

-- A published event's Web Push options (`TTL`, `Urgency`, `Topic`) as
-- compact JSON; NULL: the dispatcher's defaults.
ALTER TABLE rt_events ADD COLUMN push text;

-- The push-service host of each subscription's endpoint, for per-host
-- concurrency limits.
ALTER TABLE rt_push_subscriptions ADD COLUMN host text NOT NULL DEFAULT '';
UPDATE rt_push_subscriptions
   SET host = COALESCE(substring(endpoint from '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]+)'), '');

-- A subscription receives the events of a topic with seq > after_seq: those
-- committed after it followed the topic.
ALTER TABLE rt_push_topics ADD COLUMN after_seq bigint NOT NULL DEFAULT 0;
UPDATE rt_push_topics t
   SET after_seq = COALESCE((SELECT last_seq FROM rt_topics WHERE name = t.topic), 0);

-- Fan-out progress per topic followed by push subscriptions: deliveries exist
-- for every event with seq <= seq. A dispatcher fans a topic out while holding
-- its row lock (FOR UPDATE SKIP LOCKED), so replicas never fan out one topic
-- twice, and a crash rolls the whole step back.
CREATE TABLE rt_push_progress (
    topic text PRIMARY KEY,
    seq   bigint NOT NULL
);
INSERT INTO rt_push_progress (topic, seq)
SELECT DISTINCT t.topic, COALESCE(h.last_seq, 0)
  FROM rt_push_topics t LEFT JOIN rt_topics h ON h.name = t.topic
ON CONFLICT DO NOTHING;

-- One row per (subscription, event) to deliver, written before the first
-- attempt. `state`: pending, delivered or failed. A dispatcher claims due
-- pending rows (FOR UPDATE SKIP LOCKED) by moving `next_attempt_at` one lease
-- ahead and setting `claimed_by`; if it dies, the rows fall due again when
-- the lease ends and another dispatcher takes them. `attempts` counts claims
-- and fences outcomes: only the claim that made it may record one.
-- `notice`: the last attempt sent a notice (topic and seq) instead of the event.
-- `host`: the subscription's push-service host, copied so that a claim (which
-- limits each host) reads this table's due index alone.
CREATE TABLE rt_push_deliveries (
    id              bigserial PRIMARY KEY,
    subscription_id text NOT NULL REFERENCES rt_push_subscriptions (id) ON DELETE CASCADE,
    topic           text NOT NULL,
    seq             bigint NOT NULL,
    host            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    notice          boolean NOT NULL DEFAULT false,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, topic, seq)
);

-- In the claim's order, so a claim reads due rows in order and stops at its
-- limit instead of sorting the whole backlog.
CREATE INDEX rt_push_deliveries_due ON rt_push_deliveries (next_attempt_at, id)
    WHERE state = 'pending';
CREATE INDEX rt_push_deliveries_finished ON rt_push_deliveries (updated_at)
    WHERE state <> 'pending';
