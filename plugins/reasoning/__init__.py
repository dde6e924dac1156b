"""reasoning: LLM calls through providers."""
