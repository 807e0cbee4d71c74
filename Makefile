# Two entry points on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
#
# constraints.txt pins every package the tests last passed with (pyproject.toml keeps ranges, for
# users who install the package into their own environment). `make upgrade-pins` resolves the newest
# versions in a scratch venv, runs the tests there, and rewrites constraints.txt only if they pass.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PINS   := constraints.txt
PIP    := pip install -q --disable-pip-version-check
DEMO_CKPT   := models/demo-checkpoint
DEMO_BUNDLE := models/demo
DEMO_IMAGE  := cli/assets/demo.png
# torch is only the tests' yardstick (export/reference); nothing `make demo` runs needs it. A plain
# `pip install torch` on Linux pulls a multi-GB CUDA build, so the CPU build comes from PyTorch's CPU
# index where that index is reachable; elsewhere pip takes torch==2.13.0 from its configured sources.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
REACHABLE = $(1) -c "import socket,sys; socket.setdefaulttimeout(5); \
	sys.exit(0 if socket.getaddrinfo('download.pytorch.org', 443) else 1)" 2>/dev/null

.PHONY: demo test lint clean upgrade-pins test-arm64 test-real

# The runtime and the exporter: what `make demo` needs (no torch).
$(BIN)/.installed-base: pyproject.toml $(PINS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) -c $(PINS) pip
	$(BIN)/$(PIP) -c $(PINS) -e ".[export]"
	touch $@

# Everything `make test` runs: the CPU build of torch, the server, audio and test extras.
$(BIN)/.installed: $(BIN)/.installed-base
	@if $(call REACHABLE,$(BIN)/python); then \
		echo "torch $(TORCH_VERSION) (CPU build) from $(TORCH_CPU_INDEX)"; \
		$(BIN)/$(PIP) -c $(PINS) torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	else \
		echo "$(TORCH_CPU_INDEX) unreachable: torch==$(TORCH_VERSION) from pip's configured sources"; \
		$(BIN)/$(PIP) -c $(PINS) torch==$(TORCH_VERSION); \
	fi
	$(BIN)/$(PIP) -c $(PINS) -e ".[export,server,audio,test]"
	touch $@

demo: $(BIN)/.installed-base
	@test -f $(DEMO_CKPT)/config.json || $(BIN)/minicpmo synth $(DEMO_CKPT) --size tiny --seed 0
	$(BIN)/minicpmo export $(DEMO_CKPT) -o $(DEMO_BUNDLE) --overwrite
	$(BIN)/minicpmo infer --model $(DEMO_BUNDLE) --image $(DEMO_IMAGE) \
		--prompt "What is in this picture?" --max-tokens 24

lint: $(BIN)/.installed
	$(BIN)/ruff check export runtime cli tests benchmarks

test: lint
	$(BIN)/pytest -q

# Newest versions of everything, tested in a scratch venv; the pins move only if the tests pass.
upgrade-pins:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/$(PIP) --upgrade pip
	@if $(call REACHABLE,.venv-upgrade/bin/python); then \
		.venv-upgrade/bin/$(PIP) torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	else .venv-upgrade/bin/$(PIP) torch==$(TORCH_VERSION); fi
	.venv-upgrade/bin/$(PIP) --upgrade -e ".[export,server,audio,test]"
	.venv-upgrade/bin/ruff check export runtime cli tests benchmarks
	.venv-upgrade/bin/pytest -q
	{ echo "# The versions \`make test\` last passed with (\`make upgrade-pins\` rewrites this file)."; \
	  .venv-upgrade/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; \
	  echo "pip==$$(.venv-upgrade/bin/pip --version | cut -d' ' -f2)"; } > $(PINS)
	rm -rf .venv-upgrade
	@echo "$(PINS) updated; \`rm -rf $(VENV)\` to reinstall from it"

# Not in CI (downloads 0.5 GB, ~15 min): trained Qwen2.5-Coder-0.5B weights grafted into the MiniCPM-o
# format, against transformers and as the KL of the default export (tests/real/).
test-real: $(BIN)/.installed
	$(BIN)/$(PIP) -c $(PINS) gguf transformers
	MINICPMO_REAL_WEIGHTS=1 $(BIN)/pytest -q tests/real

# Not in CI (slow): the runtime on an emulated arm64 Debian, against this host's run (tests/arm64/).
test-arm64: $(BIN)/.installed
	tests/arm64/run.sh

clean:
	rm -rf $(VENV) $(DEMO_CKPT) $(DEMO_BUNDLE)
