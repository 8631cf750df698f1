"""The output folder: the annotation table (schema, parts, manifest) and the keys that name files across runs."""
