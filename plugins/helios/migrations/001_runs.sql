CREATE TABLE IF NOT EXISTS helios_runs (
    job_id      text PRIMARY KEY,
    owner       text NOT NULL DEFAULT '',
    question    text NOT NULL,
    answer      text NOT NULL,
    confidence  double precision NOT NULL,
    elapsed_ms  double precision NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS helios_answers (
    job_id      text NOT NULL REFERENCES helios_runs (job_id) ON DELETE CASCADE,
    expert      text NOT NULL,
    status      text NOT NULL,
    answer      text NOT NULL DEFAULT '',
    confidence  double precision NOT NULL DEFAULT 0,
    weight      double precision NOT NULL DEFAULT 0,
    latency_ms  double precision NOT NULL DEFAULT 0,
    cached      boolean NOT NULL DEFAULT false,
    error       text NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, expert)
);
