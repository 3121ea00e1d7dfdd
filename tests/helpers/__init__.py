"""Plain helpers shared by the tests (and by benchmarks/ where they need the same code); no fixtures here.

paths (REPO, CONF), overrides (TINY, ONE_BATCH, PREDICT), config (compose_cfg), runs (run_script, run_predict),
images (photo, car_jpeg, train_jpegs), stops (callbacks that stop a run at a chosen epoch), reference (what a
checkpoint predicts, without carnet's inference code), servers (a real HTTP server in a subprocess), devtools
(Chromium over the DevTools protocol), faults (signals and NaN weights injected into a real run), tolerances (how
close two float32 paths agree). The pytest fixtures (tiny_data, train_run, cfg_factory, tiny_checkpoint) stay in
tests/conftest.py.
"""
