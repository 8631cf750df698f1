"""`annotate bench`: the engine against the loop people write, with the machine measures and answer lengths."""
