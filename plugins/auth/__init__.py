"""auth: users in PostgreSQL, JWT issue/verify, Redis claim cache and revocation."""
