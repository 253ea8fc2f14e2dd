"""Input processing: images (loading, limits, per-family preprocessing), prompts, batching."""
