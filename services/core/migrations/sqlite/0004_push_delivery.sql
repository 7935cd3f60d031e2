-- Web Push delivery; see the Postgres migration for what each table and
-- column means. One process writes, in `BEGIN IMMEDIATE` transactions, so
-- fan-out and claims need no row locks here.

-- A published event's Web Push options as compact JSON; NULL: the defaults.
ALTER TABLE rt_events ADD COLUMN push TEXT;

-- The push-service host (and port) of each subscription's endpoint: what
-- follows `://`, up to the first '/', '?' or '#'.
ALTER TABLE rt_push_subscriptions ADD COLUMN host TEXT NOT NULL DEFAULT '';
UPDATE rt_push_subscriptions
   SET host = CASE WHEN instr(endpoint, '://') > 0
                   THEN substr(endpoint, instr(endpoint, '://') + 3)
                   ELSE endpoint END;
UPDATE rt_push_subscriptions SET host = substr(host, 1, instr(host, '/') - 1)
 WHERE instr(host, '/') > 0;
UPDATE rt_push_subscriptions SET host = substr(host, 1, instr(host, '?') - 1)
 WHERE instr(host, '?') > 0;
UPDATE rt_push_subscriptions SET host = substr(host, 1, instr(host, '#') - 1)
 WHERE instr(host, '#') > 0;

-- A subscription receives the events of a topic with seq > after_seq.
ALTER TABLE rt_push_topics ADD COLUMN after_seq INTEGER NOT NULL DEFAULT 0;
UPDATE rt_push_topics
   SET after_seq = COALESCE((SELECT last_seq FROM rt_topics WHERE name = rt_push_topics.topic), 0);

-- Fan-out progress per topic followed by push subscriptions: deliveries exist
-- for every event with seq <= seq.
CREATE TABLE rt_push_progress (
    topic TEXT PRIMARY KEY,
    seq   INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO rt_push_progress (topic, seq)
SELECT DISTINCT t.topic, COALESCE(h.last_seq, 0)
  FROM rt_push_topics t LEFT JOIN rt_topics h ON h.name = t.topic;

-- One row per (subscription, event) to deliver. AUTOINCREMENT: an id is never
-- reused, so an outcome of a removed row cannot land on a newer one.
CREATE TABLE rt_push_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id TEXT NOT NULL REFERENCES rt_push_subscriptions (id) ON DELETE CASCADE,
    topic           TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    host            TEXT NOT NULL, -- the subscription's, for per-host claims
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_us INTEGER NOT NULL, -- microseconds since the Unix epoch
    claimed_by      TEXT,
    notice          INTEGER NOT NULL DEFAULT 0,
    last_status     INTEGER,
    last_error      TEXT,
    created_us      INTEGER NOT NULL,
    updated_us      INTEGER NOT NULL,
    UNIQUE (subscription_id, topic, seq)
);

CREATE INDEX rt_push_deliveries_due ON rt_push_deliveries (next_attempt_us, id)
    WHERE state = 'pending';
CREATE INDEX rt_push_deliveries_finished ON rt_push_deliveries (updated_us)
    WHERE state <> 'pending';
