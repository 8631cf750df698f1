"""Finding and reading the images: folders, lists, URLs and tar shards, their decode, and tiles cut from large ones."""
