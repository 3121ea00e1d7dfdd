"""Hydra overrides for runs that fit the test suite; a test adds only what it needs on top of them."""

from __future__ import annotations

# A real training run in seconds (conf/train.yaml): tiny model, tiny images, CPU, no progress bar noise.
TINY = [
    "model=test_efficientnet",
    "model.pretrained=false",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "image_size=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "budget.min_steps=0",  # the phases' floor of optimizer steps (conf/phase) would multiply these runs' epochs
]

# One batch per epoch, no sanity check, no image verification: for tests that need one optimizer step an epoch
# (the CPU is shared).
ONE_BATCH = [*TINY, "trainer.num_sanity_val_steps=0", "data.verify=false", "+trainer.limit_train_batches=1",
             "+trainer.limit_val_batches=1"]

# predict (conf/predict.yaml) in this process's threads, in small batches (several batches on the tiny data).
PREDICT = ["data.num_workers=0", "data.batch_size=4"]
