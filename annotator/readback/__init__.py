"""Reading a run folder back: `annotate info`, `preview`, `eval`, drawing, and quality on synthetic folders."""
