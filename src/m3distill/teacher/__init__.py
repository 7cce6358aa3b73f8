"""The teacher: its fingerprint and the cache of its embeddings (loading models: :mod:`m3distill.models`)."""
