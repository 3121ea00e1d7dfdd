# carnet: `make demo` and `make test` are all a new user needs; every target installs .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

DEMO_DATA ?= demo_data
DEMO_RUN ?= outputs/demo
DATA ?= data

.PHONY: install demo data pipeline test test-all test-lowest lint clean

install: $(STAMP)

# Re-run only when pyproject.toml changes. pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Synthetic cars in the Kaggle layout, then a from-scratch CPU training of timm's tiny test_efficientnet
# (recipe: conf/experiment/demo.yaml). DEMO_ARGS adds Hydra overrides, e.g. DEMO_ARGS=trainer.max_epochs=5.
demo: install
	test -f $(DEMO_DATA)/sample-submission.csv || $(VENV)/bin/carnet-demo $(DEMO_DATA)
	$(PY) train.py experiment=demo data.root=$(DEMO_DATA) hydra.run.dir=$(DEMO_RUN) $(DEMO_ARGS)
	@echo "demo run: $(DEMO_RUN)/ (checkpoints/best.ckpt, curves.png, summary.json). The model has seen drawn cars"
	@echo "only: it does not know real ones. Next: carnet-serve --ckpt $(DEMO_RUN)/checkpoints/best.ckpt, or the"
	@echo "real data: make data, then README 'Quick start on the real data'."

# The competition data via the official kaggle client (needs ~/.kaggle/kaggle.json; says how when missing).
# Idempotent: an unpacked $(DATA) is left alone. The credentials check runs before installing the client.
data: install
	$(VENV)/bin/carnet-download --root $(DATA) --check
	test -f $(VENV)/.installed-data || { $(PY) -m pip install -q -e '.[data]' && touch $(VENV)/.installed-data; }
	$(VENV)/bin/carnet-download --root $(DATA)

# Progressive unfreezing: the phases of conf/phase in their init_from order (carnet-pipeline --help lists them).
# DATA=dir MODEL=name (conf/model) ARGS='more Hydra overrides, or PHASE:key=value for one phase'.
MODEL ?=
ARGS ?=
pipeline: install
	$(VENV)/bin/carnet-pipeline data.root=$(DATA) $(if $(MODEL),model=$(MODEL)) $(ARGS)

# Test accuracy on labelled photos (benchmarks/accuracy.py): a linear probe, a plain PyTorch fine-tune and carnet's
# phases, over seeds. DATA=Kaggle-layout folder with test_labels.csv (and classes.txt), WEIGHTS=local timm weights;
# ACC_ARGS adds options, e.g. ACC_ARGS='--seeds 0 --methods probe finetune --out outputs/accuracy/quick'.
WEIGHTS ?=
ACC_ARGS ?=
.PHONY: accuracy
accuracy: install
	@test -n "$(WEIGHTS)" || { echo "make accuracy: set WEIGHTS=path/to/weights.safetensors (and DATA=dir)"; exit 2; }
	$(PY) benchmarks/accuracy.py --data $(DATA) --weights $(WEIGHTS) $(ACC_ARGS)

test: install
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q

# The fast tests again on the lowest versions pyproject.toml allows: .ci/lowest.py pins its floors into
# $(LOWEST) on top of .venv (torch stays .venv's); rebuilt when pyproject.toml changes.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml .ci/lowest.py $(STAMP)
	$(PY) .ci/lowest.py $(LOWEST)
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest -m "not slow" -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache test-artifacts $(LOWEST)
