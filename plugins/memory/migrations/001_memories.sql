-- state: 0 = written here, vector not yet confirmed; 1 = in both stores; 2 = being forgotten.
-- Recall only sees state 1; the reconciler finishes rows left in 0 or 2 by a crash.
CREATE TABLE IF NOT EXISTS memories (
    id uuid PRIMARY KEY,
    owner text NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    state smallint NOT NULL DEFAULT 0,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED
);
-- fastupdate off: a pending list filled by single-row inserts would be scanned by every query.
CREATE INDEX IF NOT EXISTS memories_tsv ON memories USING gin (tsv) WITH (fastupdate = off);
CREATE INDEX IF NOT EXISTS memories_owner ON memories (owner, created_at);
CREATE INDEX IF NOT EXISTS memories_unsettled ON memories (updated_at) WHERE state <> 1;
