-- envelope's key table (docs/FORMAT.md, section 7). Timestamps are Unix milliseconds.
CREATE TABLE IF NOT EXISTS envelope_keys (
    id          BLOB PRIMARY KEY CHECK (length(id) = 16),
    kind        TEXT NOT NULL CHECK (kind IN ('data', 'index')),
    scope       TEXT NOT NULL,
    provider    TEXT NOT NULL,
    cmk_id      TEXT NOT NULL,
    wrapped     BLOB NOT NULL,
    kms_context TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER
);
-- At most one live index key per label, so racing processes agree on one.
CREATE UNIQUE INDEX IF NOT EXISTS envelope_keys_live_index
    ON envelope_keys (scope) WHERE kind = 'index' AND retired_at IS NULL;
