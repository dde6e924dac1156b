"""learning: feedback on expert answers → per-expert and per-expertise quality scores."""
