# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates or refreshes .venv from this project's own files, with the tested
# versions of every dependency (constraints.txt; `make upgrade-constraints`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
EXTRAS := cpu,jax,demo,test

.PHONY: demo test test-fast lint format venv wheel upgrade-constraints clean

venv: $(STAMP)

# tf_keras and keras-hub (through tensorflow-text) require the `tensorflow` package,
# which pip would install over tensorflow-cpu: both go in without dependencies,
# tf_keras at the installed TensorFlow's version (setup.cfg [test] lists the rest of
# what they need). foolbox goes in without its dependencies too: the tests read only
# the 20 ImageNet photos in its data folder, and never import it.
define install
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2) -e ".[$(EXTRAS)]"
	tf=$$($(1)/bin/python -c "from importlib.metadata import version; \
	  import sys; sys.stdout.write(version('tensorflow-cpu' if sys.platform != 'darwin' \
	  else 'tensorflow').rsplit('.', 1)[0])") && \
	$(1)/bin/python -m pip install -q $(2) --no-deps "tf_keras==$$tf.*" "keras-hub>=0.21" foolbox
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
	  .venv-upgrade/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS)
	rm -rf .venv-upgrade

# A wheel of this checkout in dist/, for notebooks that install it (Colab, Drive).
wheel: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w dist .

demo: $(STAMP)
	$(VENV)/bin/shopee-tpu demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=0 --durations-min=30

# The edit-test loop: every test not marked slow (no training, no JAX process).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=5

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
