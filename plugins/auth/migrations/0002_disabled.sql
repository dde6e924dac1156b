-- Users an admin disabled: they cannot log in, and their tokens were revoked (auth.disable_user).
ALTER TABLE auth_users ADD COLUMN disabled boolean NOT NULL DEFAULT false;
