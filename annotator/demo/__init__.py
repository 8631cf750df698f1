"""The demo: the synthetic world (`annotate samples`) and the small model architecture trained on it."""
