"""From checkpoints to predictions: ensembles, image selection, batched inference, TTA, reports, export."""
