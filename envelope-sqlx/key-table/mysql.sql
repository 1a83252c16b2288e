-- envelope's key table (docs/FORMAT.md, section 7) for MySQL 8 and MariaDB 10.5+.
-- Timestamps are Unix milliseconds. A stored generated column carries the scope of live index
-- keys only, and its unique key allows at most one per label (NULLs do not collide).
CREATE TABLE IF NOT EXISTS envelope_keys (
    id               BINARY(16) NOT NULL PRIMARY KEY,
    kind             VARCHAR(8) NOT NULL,
    scope            VARCHAR(255) NOT NULL,
    provider         VARCHAR(64) NOT NULL,
    cmk_id           VARCHAR(255) NOT NULL,
    wrapped          VARBINARY(4096) NOT NULL,
    kms_context      TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    retired_at       BIGINT NULL,
    live_index_scope VARCHAR(255) AS (CASE WHEN kind = 'index' AND retired_at IS NULL THEN scope END) STORED,
    UNIQUE KEY envelope_keys_live_index (live_index_scope),
    CHECK (kind IN ('data', 'index'))
) DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
