"""Florence-2 itself: loading, converting original checkpoints, the location-token sequence, CPU kernels."""
