"""The encode stage: the sentence encoder that maps text to latents (all-MiniLM-L6-v2 by default)."""
