CREATE TABLE IF NOT EXISTS feedback (
    id bigserial PRIMARY KEY,
    job text NOT NULL,
    expert text NOT NULL,
    rater text NOT NULL DEFAULT '',
    rating real NOT NULL CHECK (rating >= 1 AND rating <= 5),
    expertise text[] NOT NULL DEFAULT '{}',
    comment text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job, expert, rater)
);
CREATE INDEX IF NOT EXISTS feedback_expert ON feedback (expert, created_at);
