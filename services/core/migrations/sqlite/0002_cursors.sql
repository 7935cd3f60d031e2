-- Named polling cursors; see the Postgres migration for what each column means.
CREATE TABLE rt_cursors (
    name       TEXT PRIMARY KEY,
    topics     TEXT NOT NULL,
    position   TEXT NOT NULL,
    created_us INTEGER NOT NULL, -- microseconds since the Unix epoch
    updated_us INTEGER NOT NULL
) WITHOUT ROWID;
