# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates or refreshes .venv from this project's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,jax,demo,test]"
	# tf_keras and keras-hub (through tensorflow-text) require the `tensorflow`
	# package, which pip would install over tensorflow-cpu: install both without
	# dependencies, tf_keras at the installed TensorFlow's version (setup.cfg [test]).
	tf=$$($(PY) -c "from importlib.metadata import version as v; print(v('tensorflow-cpu').rsplit('.', 1)[0])") && \
	$(PY) -m pip install -q --no-deps "tf_keras==$$tf.*" "keras-hub>=0.21"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shopee-tpu demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

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
