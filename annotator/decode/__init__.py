"""Generating text: the per-device engine, its batch stream, the continuous-batching scheduler, beams, KV cache."""
