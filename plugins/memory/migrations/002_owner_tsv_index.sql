-- One GIN index over (owner, tsv) lets full-text recall touch only the owner's matching
-- rows. It needs the btree_gin extension; where it cannot be created (no privilege, not
-- installed) recall still works through memories_owner and memories_tsv.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS btree_gin SCHEMA public;
    CREATE INDEX IF NOT EXISTS memories_owner_tsv ON memories USING gin (owner, tsv) WITH (fastupdate = off);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'memory: no (owner, tsv) index: %', SQLERRM;
END $$;
