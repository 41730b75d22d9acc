# make bench: set up .venv, install, run the main job.  make test: set up .venv, install, run the tests.
# .venv installs the locked set (requirements-lock.txt: Linux x86_64, Python 3.11, torch 2.14.1); make lock
# re-resolves it to the newest releases pyproject.toml allows.
# make test-latest: the import smoke and the tests that touch diffusers, transformers and open_clip, against the
# newest releases the index serves today (a venv layered on .venv; torch stays at the pins below).
# make test-floor: the tests that touch diffusers, transformers and open_clip, against the declared floor
# versions (ReNO's own pins): a second venv layered on .venv whose own packages shadow those three.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

comma := ,

.PHONY: bench test test-floor test-latest lock clean

# The floors (pyproject.toml: diffusers>=0.30, open_clip_torch>=2.24; transformers 4.38.2 is ReNO's pin),
# installed without dependencies over .venv's, with the hub and tokenizers releases transformers 4.38.2
# requires (huggingface_hub<1.0, tokenizers<0.19); everything else (torch, numpy, ...) is .venv's.
FLOORENV ?= .floorenv
FLOOR_PINS := diffusers==0.30.0 transformers==4.38.2 open_clip_torch==2.24.0 huggingface_hub==0.24.7 tokenizers==0.15.2
FLOOR_TESTS := tests/test_reno.py tests/test_reno_transcription.py tests/test_pixel_reward_fidelity.py \
	tests/test_zeroshot_rewards.py tests/test_tiny_decoder.py tests/test_model.py tests/test_checkpoint.py \
	tests/test_reference_values.py tests/test_bench_reno_cost.py
FLOOR_STAMP := $(FLOORENV)/.installed

# The newest releases: the floor's tests, the shadowing check, and the other tests that build diffusers VAEs and
# pipelines, transformers CLIPModel teachers and open_clip towers.
LATESTENV ?= .latestenv
LATEST_TESTS := $(FLOOR_TESTS) tests/test_packaging.py tests/test_vaes.py tests/test_latent_spaces.py \
	tests/test_reno_dropin.py tests/test_integrations.py tests/test_latent_spaces_2026.py tests/test_space_models.py \
	tests/test_video_spaces.py tests/test_video_scoring.py

# The extras make installs; the torch build the lock is resolved against (these wheels lie on this machine's disk).
EXTRAS := test,bench,ray,serve
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
LOCK := requirements-lock.txt

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $@

# uv resolves for the lock's platform whatever this machine is; --upgrade takes the newest releases.
lock:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	printf '%s\n' $(TORCH_PINS) | UV_CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/uv pip compile -q --upgrade \
		pyproject.toml - $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o $(LOCK)

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


# A venv layered on .venv (its torch build is reused: the pins hold); pip installs there whatever is newer than
# .venv's, resolving every dependency (a new one, like transformers 5.25's kernels, comes too), and leaves .venv be.
test-latest: $(STAMP)
	rm -rf $(LATESTENV)
	python3 -m venv $(LATESTENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import site; print(site.getsitepackages()[0])')')" \
		> "$$($(LATESTENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_base.pth"
	printf '%s\n' $(TORCH_PINS) > $(LATESTENV)/torch-pins.txt
	$(LATESTENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATESTENV)/torch-pins.txt \
		-e '.[$(EXTRAS)]'
	$(LATESTENV)/bin/python -c "import kernels, open_clip, fastlclip, importlib.metadata as m; \
		from diffusers import AutoencoderKL, UNet2DConditionModel; from transformers import CLIPModel; \
		assert 'site-packages' in kernels.__file__, 'kernels is the checkout: ' + kernels.__file__; \
		print('latest:', ', '.join(d + ' ' + m.version(d) for d in ('diffusers', 'transformers', 'open_clip_torch', \
		'kernels', 'huggingface_hub', 'tokenizers', 'torch')))"
	TRITON_INTERPRET=1 $(LATESTENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile \
		$(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(FLOORENV) $(LATESTENV) .pytest_cache .benchmarks
