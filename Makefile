# make bench: set up .venv, install, run the main job.  make test: set up .venv, install, run the tests.
# make test-floor: the tests that touch diffusers, transformers and open_clip, against the declared floor
# versions (ReNO's own pins): a second venv layered on .venv whose own packages shadow those three.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test test-floor clean

# The floors (pyproject.toml: diffusers>=0.30, open_clip_torch>=2.24; transformers 4.38.2 is ReNO's pin),
# installed without dependencies over .venv's, with the hub and tokenizers releases transformers 4.38.2
# requires (huggingface_hub<1.0, tokenizers<0.19); everything else (torch, numpy, ...) is .venv's.
FLOORENV ?= .floorenv
FLOOR_PINS := diffusers==0.30.0 transformers==4.38.2 open_clip_torch==2.24.0 huggingface_hub==0.24.7 tokenizers==0.15.2
FLOOR_TESTS := tests/test_reno.py tests/test_reno_transcription.py tests/test_pixel_reward_fidelity.py \
	tests/test_zeroshot_rewards.py tests/test_tiny_decoder.py tests/test_model.py tests/test_checkpoint.py \
	tests/test_reference_values.py tests/test_bench_reno_cost.py
FLOOR_STAMP := $(FLOORENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench,ray,serve]'
	touch $@

bench: $(STAMP)
	$(PY) -m bench.reno_cost

# Two pytest-xdist workers (this machine's two cores), a test file per worker at a time: a file's module-scoped
# fixtures (tiny models, the distillation world and its background torchrun) are built once.
TEST_WORKERS ?= 2

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

$(FLOOR_STAMP): $(STAMP) Makefile
	rm -rf $(FLOORENV)
	python3 -m venv --without-pip $(FLOORENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(FLOORENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_base.pth"
	$(PY) -m pip install -q --no-deps --target "$$($(FLOORENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')" $(FLOOR_PINS)
	touch $@

test-floor: $(FLOOR_STAMP)
	$(FLOORENV)/bin/python -c "import diffusers, transformers, importlib.metadata as m; \
		print('floor:', 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, \
		'open_clip_torch', m.version('open_clip_torch'))"
	TRITON_INTERPRET=1 $(FLOORENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

clean:
	rm -rf $(VENV) $(FLOORENV) .pytest_cache .benchmarks
