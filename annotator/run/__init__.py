"""`annotate run`: one device, worker processes and torchrun, Ray, the dry run, and signal handling."""
