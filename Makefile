# make bench: set up .venv, install, run the main job.  make test: set up .venv, install, run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench,ray,serve]'
	touch $@

bench: $(STAMP)
	$(PY) -m bench.reno_cost

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
