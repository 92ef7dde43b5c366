# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates or refreshes .venv from this project's own files, with the tested
# versions of every dependency (constraints.txt; `make upgrade-constraints`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
EXTRAS := cpu,jax,demo,gcs,test

.PHONY: demo test test-long test-fast test-kaggle-tpu lint format venv wheel upgrade-constraints \
	upgrade-kaggle-tpu-constraints clean

venv: $(STAMP)

# uv installs the set in about half pip's time from an empty cache
# (docs/benchmarks.md). It compiles the bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set, a venv without it compiles every import from source
# in every process, which doubles the CPU of `import tensorflow, keras, jax`. uv does
# not read pip's config: every version comes from the constraints file or the pins
# given.
# tf_keras and keras-hub (through tensorflow-text) require the `tensorflow` package,
# which would go in over tensorflow-cpu: both go in without dependencies, tf_keras
# at the installed TensorFlow's version (setup.cfg [test] lists the rest of what they
# need). foolbox goes in without its dependencies too: the tests read only the 20
# ImageNet photos in its data folder, and never import it.
UV := uv==0.13.9
define install
	$(1)/bin/python -m pip install -q "$(UV)"
	$(1)/bin/python -m uv pip install -q --compile-bytecode --python $(1)/bin/python $(2) -e ".[$(EXTRAS)]"
	tf=$$($(1)/bin/python -c "from importlib.metadata import version; \
	  import sys; sys.stdout.write(version('tensorflow-cpu' if sys.platform != 'darwin' \
	  else 'tensorflow').rsplit('.', 1)[0])") && \
	$(1)/bin/python -m uv pip install -q --compile-bytecode --python $(1)/bin/python $(2) --no-deps \
	  "tf_keras==$$tf.*" "keras-hub>=0.21" foolbox
endef

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,$(VENV),-c $(CONSTRAINTS))
	touch $(STAMP)

# The newest versions the ranges in setup.cfg allow, installed in a scratch venv
# and frozen; run `make test` after it, and commit constraints.txt if it passes.
upgrade-constraints:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	$(call install,.venv-upgrade,)
	{ echo "# The tested set: make test and CI install with -c $(CONSTRAINTS)."; \
	  echo "# Regenerate with make upgrade-constraints ($(PYTHON), Linux x86-64)."; \
	  .venv-upgrade/bin/python -m pip freeze --exclude-editable --exclude uv; } > $(CONSTRAINTS)
	rm -rf .venv-upgrade

# Kaggle's TPU image (Kaggle/docker-python tpu/; constraints-kaggle-tpu.txt names
# the commit): Python 3.12, jax 0.7.2 (CPU jaxlib of the same version here; the
# image has libtpu), tensorflow-cpu 2.20 and the newest keras. Its own venv; it runs
# the JAX and kernel tests.
KAGGLE_TPU_VENV := .venv-kaggle-tpu
KAGGLE_TPU_CONSTRAINTS := constraints-kaggle-tpu.txt
KAGGLE_TPU_PINS := jax==0.7.2 jaxlib==0.7.2 tensorflow-cpu==2.20.0
KAGGLE_TPU_PYTHON ?= $(shell for p in python3.12 \
  $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
  $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
KAGGLE_TPU_TESTS := tests/test_training_jax.py tests/test_multihost_jax.py \
  tests/test_multihost_runs.py \
  tests/test_accelerator_distributed.py tests/test_inference_tta.py tests/test_kernels.py \
  tests/test_notebooks.py tests/test_gcs_run.py tests/test_fs_gcs.py

$(KAGGLE_TPU_VENV)/.installed: setup.cfg pyproject.toml $(KAGGLE_TPU_CONSTRAINTS)
	@test -n "$(KAGGLE_TPU_PYTHON)" || { echo "Kaggle's TPU image runs Python \
	3.12: install it, or set KAGGLE_TPU_PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(KAGGLE_TPU_VENV)/bin/python || $(KAGGLE_TPU_PYTHON) -m venv $(KAGGLE_TPU_VENV)
	$(call install,$(KAGGLE_TPU_VENV),-c $(KAGGLE_TPU_CONSTRAINTS))
	touch $@

test-kaggle-tpu: $(KAGGLE_TPU_VENV)/.installed
	$(KAGGLE_TPU_VENV)/bin/python -c "import jax, keras, tensorflow as tf, sys; \
	  print('Kaggle TPU set: python', sys.version.split()[0], 'jax', jax.__version__, \
	  'keras', keras.__version__, 'tensorflow', tf.__version__)"
	$(KAGGLE_TPU_VENV)/bin/python -m pytest -q -n 2 --dist loadgroup \
	  --durations=0 --durations-min=30 $(KAGGLE_TPU_TESTS)

# The image's pins and the newest of everything else they allow, frozen; read the
# pins again from Kaggle/docker-python's tpu/ files when the image changes.
upgrade-kaggle-tpu-constraints:
	rm -rf .venv-kaggle-upgrade
	$(KAGGLE_TPU_PYTHON) -m venv .venv-kaggle-upgrade
	$(call install,.venv-kaggle-upgrade,$(KAGGLE_TPU_PINS))
	{ sed -n '/^# /p' $(KAGGLE_TPU_CONSTRAINTS); \
	  .venv-kaggle-upgrade/bin/python -m pip freeze --exclude-editable --exclude uv; } > $(KAGGLE_TPU_CONSTRAINTS).new
	mv $(KAGGLE_TPU_CONSTRAINTS).new $(KAGGLE_TPU_CONSTRAINTS)
	rm -rf .venv-kaggle-upgrade

# A wheel of this checkout in dist/, for notebooks that install it (Colab, Drive).
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .

demo: $(STAMP)
	$(VENV)/bin/shopee-tpu demo --out runs/demo

# Every test but the whole-workflow runs (marked long), in 15 minutes or less from a
# fresh clone on 2 cores; CI runs it, then test-long (.ci/run).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not long" --durations=0 --durations-min=30

# The whole-workflow runs: recipes trained to their end, several hosts, the
# notebooks' smoke runs and the benchmarks that train.
test-long: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m long --durations=0 --durations-min=30

# The edit-test loop: every test not marked slow (no training, no JAX process).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not long" --durations=5

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(KAGGLE_TPU_VENV) runs .pytest_cache
