"""Generated text -> typed rows: parsing, confidence scores, merging tiled answers, assembling Annotation rows."""
