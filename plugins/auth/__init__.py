"""auth: users in PostgreSQL, JWT issue/verify (local, never waiting for Redis), revocation in memory and Redis."""
