"""`python -m annotator ...` is the `annotate` command (handy where the console script is not on PATH)."""

from .cli import main

main()
