# cobra_scale — every target creates .venv and installs on first use.
#   make demo   install + run every stage that exists on a small synthetic dataset
#   make test   install + the whole test suite (what CI runs via .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := data/demo

# Loopback only, offline model files, caches inside the project (see docs/operations.md).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast beauty clean-demo device-deps

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/cobra data synth --out $(DEMO)/raw --users 20000 --items 3000 --days 7 overwrite=true
	$(BIN)/cobra data sessionize --events $(DEMO)/raw/events --items $(DEMO)/raw/items.parquet --out $(DEMO)/sequences --shards 2
	$(BIN)/cobra data split --sequences $(DEMO)/sequences --out $(DEMO)/splits/time kind=time
	$(BIN)/cobra data split --sequences $(DEMO)/sequences --out $(DEMO)/splits/loo kind=loo
	$(BIN)/cobra ids --items $(DEMO)/raw/items.parquet --out $(DEMO)/ids quantizer.levels=2 quantizer.codes=32
	$(BIN)/cobra train --data $(DEMO) --items $(DEMO)/raw/items.parquet --ids $(DEMO)/ids --out $(DEMO)/run \
		--epochs 2 --eval-users 2000 --no-resume model.d_model=64 model.encoder_dim=64 model.text_tokens=24
	$(BIN)/cobra eval --run $(DEMO)/run --split-name test --exclude-history --max-users 2000 modes=[cobra,no_fusion]
	$(BIN)/cobra recommend --run $(DEMO)/run --users 2 --k 5
	BIN=$(BIN) tools/demo_serve.sh $(DEMO)/run $(DEMO)/splits/loo/test
	@echo "demo outputs under $(DEMO)/"

# The public benchmark, read from the shared folder (never copied into the project).
BEAUTY_SRC ?= ../shared/datasets/amazon-beauty
beauty: install
	$(BIN)/cobra data amazon --src $(BEAUTY_SRC) --out data/beauty
	$(BIN)/cobra ids --items data/beauty/items.parquet --out data/beauty/ids
	$(BIN)/cobra ids --items data/beauty/items.parquet --out data/beauty/ids_beh behaviour.sequences=data/beauty/splits/loo/train

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration" tests

device-deps: install  # what tools/gpu_check.sh needs on a bare GPU machine beyond its image (pure Python; carried as build/device_pkgs)
	$(VENV)/bin/pip install -q --no-deps --upgrade --target build/device_pkgs 'omegaconf==2.4.0'

clean-demo:
	rm -rf $(DEMO)
