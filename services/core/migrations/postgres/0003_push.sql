-- Web Push (push-dispatcher).
--
-- `rt_vapid_keys` holds the one VAPID key pair used when none is configured:
-- the raw P-256 private scalar, base64url without padding (the public key is
-- derived from it). The first process to start inserts it; every other one
-- reads that row back, so all replicas sign with the same key.
CREATE TABLE rt_vapid_keys (
    id          smallint PRIMARY KEY CHECK (id = 1),
    private_key text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A browser's push subscription. `endpoint` is unique: registering it again
-- updates the row (it keeps its `id`). `p256dh` and `auth` are the browser's
-- keys (base64url without padding), `expiration_ms` the browser's
-- `expirationTime` (milliseconds since the epoch). `subject` is the `sub` of
-- the token that registered it (NULL: anonymous). `notice_only`: send only
-- topic and seq, never the event's data.
CREATE TABLE rt_push_subscriptions (
    id            text PRIMARY KEY,
    subject       text,
    endpoint      text NOT NULL UNIQUE,
    p256dh        text NOT NULL,
    auth          text NOT NULL,
    expiration_ms bigint,
    notice_only   boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rt_push_subscriptions_subject ON rt_push_subscriptions (subject);

-- The topics of each subscription, one row each, indexed by topic for the
-- dispatcher's "who follows this topic" lookups.
CREATE TABLE rt_push_topics (
    subscription_id text NOT NULL REFERENCES rt_push_subscriptions (id) ON DELETE CASCADE,
    topic           text NOT NULL,
    PRIMARY KEY (subscription_id, topic)
);

CREATE INDEX rt_push_topics_topic ON rt_push_topics (topic, subscription_id);
