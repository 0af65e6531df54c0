"""Losses, gating, pure train/eval steps, trainer loop, checkpointing."""
