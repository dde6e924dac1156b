-- issue 15: quorum and token budgets. Defaults keep rows written before them valid.
ALTER TABLE helios_runs ADD COLUMN IF NOT EXISTS min_answers integer NOT NULL DEFAULT 0;
ALTER TABLE helios_runs ADD COLUMN IF NOT EXISTS token_budget integer NOT NULL DEFAULT 0;
ALTER TABLE helios_runs ADD COLUMN IF NOT EXISTS tokens_spent integer NOT NULL DEFAULT 0;
ALTER TABLE helios_answers ADD COLUMN IF NOT EXISTS tokens integer NOT NULL DEFAULT 0;
