# make demo   the main job on its embedded default (see README)
# make test   the unit tests (CPU, tiny configs); make test-slow: the full-size checks marked slow
# Both create .venv and install the package with its test extra the first time, and again when setup.py changes.
PYTHON ?= python3
WORKERS ?= 2
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m sc_dpo_jax.main --config=configs/toy.py --workdir=workdir/demo

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist loadgroup

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -v

clean:
	rm -rf $(VENV) workdir build *.egg-info
