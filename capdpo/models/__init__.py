"""Models: turning weights shipped in odd formats into plain Hugging Face checkpoints."""
