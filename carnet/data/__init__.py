"""From files on disk to batches: layout, decoding, splits, sources, cache, dedup, transforms, the DataModule."""
