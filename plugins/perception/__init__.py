"""perception: request analysis (intent, entities, language, required expertise)."""
