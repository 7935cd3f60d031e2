-- Named polling cursors: a set of topics and the position committed in them.
-- `topics` is the comma-joined topic list, `position` the `topic:seq,...`
-- string of the wire contract (both validated before they are written).
CREATE TABLE rt_cursors (
    name       text PRIMARY KEY,
    topics     text NOT NULL,
    position   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
