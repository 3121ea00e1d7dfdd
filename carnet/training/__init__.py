"""Training: the LightningModule, builders from config, phases and unfreezing, head fitting, the run directory."""
