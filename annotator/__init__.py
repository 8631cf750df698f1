"""florence-annotate: batch-annotate image folders with Florence-2 and export training sets."""

__version__ = "0.1.0"
