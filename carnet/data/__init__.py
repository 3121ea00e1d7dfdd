"""From files on disk to batches: layout, decoding, splits, sources, cache, dedup, transforms, the torch dataset and
its loader rules, the DataModule (the only module here that imports Lightning)."""
