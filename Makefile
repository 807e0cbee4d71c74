# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_CKPT   := models/demo-checkpoint
DEMO_BUNDLE := models/demo
DEMO_IMAGE  := cli/assets/demo.png

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	# The CPU build of torch (export only); an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[export,server,audio,test]"
	touch $@

demo: $(BIN)/.installed
	@test -f $(DEMO_CKPT)/config.json || $(BIN)/minicpmo synth $(DEMO_CKPT) --size tiny --seed 0
	$(BIN)/minicpmo export $(DEMO_CKPT) -o $(DEMO_BUNDLE) --overwrite
	$(BIN)/minicpmo infer --model $(DEMO_BUNDLE) --image $(DEMO_IMAGE) \
		--prompt "What is in this picture?" --max-tokens 24

lint: $(BIN)/.installed
	$(BIN)/ruff check export runtime cli tests benchmarks

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(DEMO_CKPT) $(DEMO_BUNDLE)
