"""helios: the expert coordinator (select, fan out in parallel, stream, synthesise, store)."""
