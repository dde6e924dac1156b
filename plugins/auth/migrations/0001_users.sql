-- Users of the auth plugin. Tables are unqualified: they land in the first schema of the
-- connection's search_path, so one database can hold several isolated deployments.
CREATE TABLE auth_users (
    id            uuid        PRIMARY KEY,
    username      text        NOT NULL,
    password_hash text        NOT NULL,
    scopes        text[]      NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Usernames are unique regardless of case ("Alice" and "alice" are one user).
CREATE UNIQUE INDEX auth_users_username_lower_key ON auth_users (lower(username));
