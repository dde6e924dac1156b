"""memory: hybrid memory, PostgreSQL full text plus Qdrant vectors, fused ranking."""
