"""Checkpoint readers: each yields (Hugging Face name, tensor) and knows nothing of the engine."""
