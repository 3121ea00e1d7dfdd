"""Tools around training: data audit, run reports, synthetic demo data, the Kaggle download."""
