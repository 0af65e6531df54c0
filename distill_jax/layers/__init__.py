"""Shared building blocks: linear/embedding, norms, rotary embeddings, attention."""
