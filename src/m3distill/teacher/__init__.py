"""The teacher: loading sentence-transformers models and caching the teacher's embeddings."""
