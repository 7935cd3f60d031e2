-- Web Push; see the Postgres migration for what each table and column means.
CREATE TABLE rt_vapid_keys (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    private_key TEXT NOT NULL,
    created_us  INTEGER NOT NULL -- microseconds since the Unix epoch
);

CREATE TABLE rt_push_subscriptions (
    id            TEXT PRIMARY KEY,
    subject       TEXT,
    endpoint      TEXT NOT NULL UNIQUE,
    p256dh        TEXT NOT NULL,
    auth          TEXT NOT NULL,
    expiration_ms INTEGER,
    notice_only   INTEGER NOT NULL DEFAULT 0,
    created_us    INTEGER NOT NULL, -- microseconds since the Unix epoch
    updated_us    INTEGER NOT NULL
);

CREATE INDEX rt_push_subscriptions_subject ON rt_push_subscriptions (subject);

CREATE TABLE rt_push_topics (
    subscription_id TEXT NOT NULL REFERENCES rt_push_subscriptions (id) ON DELETE CASCADE,
    topic           TEXT NOT NULL,
    PRIMARY KEY (subscription_id, topic)
) WITHOUT ROWID;

CREATE INDEX rt_push_topics_topic ON rt_push_topics (topic, subscription_id);
