# bnorder: `make test` and `make run` set everything up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnorder-setup

.PHONY: setup test test-all test-triton-ends clean data run bench profile

setup: $(STAMP) data

# Fashion-MNIST from Debian's dataset-fashion-mnist (apt as root, else apt-get download + dpkg -x
# into .cache/); a failure only warns here, `make run` then stops with both routes named.
data:
	-@bnorder/install_data.sh

# install_requirements.py takes the CUDA build of the pinned torch where nvidia-smi lists a
# GPU (BNORDER_TORCH=cpu|cuda overrides), the pin as it is elsewhere.
$(STAMP): requirements.txt setup.py pyproject.toml fused/_pins.py bnorder/install_requirements.py \
          $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) bnorder/install_requirements.py
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fused; assert fused.extension_error() is None, fused.extension_error()"
	touch $(STAMP)

# Extras the tests exercise (Ray, for `bnorder study --executor ray`) at the pins of setup.py's
# extras_require, read back from the installed package's metadata.
EXTRAS_STAMP := $(VENV)/.bnorder-test-extras
$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q $$($(PY) -c "from importlib.metadata \
	  import requires; print(*(r.split(';')[0] for r in requires('bnorder') if 'extra == \"ray\"' in r))")
	touch $@

test: setup $(EXTRAS_STAMP)
	$(PY) -m pytest -q

# Everything, including the long checks behind the `slow` marker.
test-all: setup $(EXTRAS_STAMP)
	$(PY) -m pytest -q -m ""

# The Triton kernels in the interpreter on the other supported Triton end(s) (fused/_pins.py;
# today triton 3.8.0, torch 2.14's), each in its own venv with the pinned torch: ≈ 4 min each.
TRITON_ENDS = $(shell $(PYTHON) -c "import runpy; p = runpy.run_path('fused/_pins.py'); \
	print(*sorted(set(p['TRITON_FOR_TORCH'].values()) - {p['TRITON']}))")
test-triton-ends: setup
	@for v in $(TRITON_ENDS); do \
	  venv=.venv-triton-$$v; \
	  test -x $$venv/bin/python || $(PYTHON) -m venv $$venv || exit 1; \
	  grep -v '^triton==' requirements.txt > $$venv/requirements.txt; \
	  $$venv/bin/python -m pip install --disable-pip-version-check -q -r $$venv/requirements.txt \
	    && $$venv/bin/python -m pip install --disable-pip-version-check -q --no-deps triton==$$v \
	    || exit 1; \
	  echo "triton $$v: TRITON_INTERPRET=1 FUSED_BACKEND=triton pytest tests/triton"; \
	  TRITON_INTERPRET=1 FUSED_BACKEND=triton $$venv/bin/python -m pytest tests/triton -q || exit 1; \
	done

# The study's quick preset on Fashion-MNIST (≤ 15 minutes on 2 cores, set-up included: the time
# set-up took comes off the study's 600 s training budget); prints the table and report path.
RUN_START := $(shell date +%s)
run: setup
	@left=$$((600 - $$(date +%s) + $(RUN_START))); [ $$left -ge 120 ] || left=120; \
	echo "$(PY) -m bnorder study --preset quick --out runs/study-quick --budget-s $$left"; \
	$(PY) -m bnorder study --preset quick --out runs/study-quick --budget-s $$left

# pytest-benchmark suites (half an hour or more on 2 quiet cores: every torch.compile case
# compiles afresh, 10-60 s each) into runs/bench/<time>.json and .md, untracked; CANONICAL=1
# also files the run as benchmarks/results/<machine>-<suite>.json and .md, the current
# results. BENCH_ARGS adds pytest options (e.g. BENCH_ARGS="-k resnet20" or "--wide").
BENCH_DIR  := runs/bench
BENCH_OUT  := $(BENCH_DIR)/$(shell date -u +%Y%m%dT%H%M%S)
bench: setup
	mkdir -p $(BENCH_DIR)
	env $$($(PY) -c "from benchmarks.common import ALLOCATOR_ENV as e; print(*(f'{k}={v}' for k, v in e.items()))") \
	  $(PY) -m pytest benchmarks/ --benchmark-only -p no:cacheprovider --benchmark-json=$(BENCH_OUT).json $(BENCH_ARGS)
	$(PY) -m benchmarks.report $(BENCH_OUT).json -o $(BENCH_OUT).md
	@echo "wrote $(BENCH_OUT).json and $(BENCH_OUT).md"
	$(if $(CANONICAL),$(PY) -m benchmarks.report $(BENCH_OUT).json --canonical)

# Where the ResNet-20 step goes (minutes: one torch.compile per case and compiled provider):
# every provider's time in ATen's convolutions vs the rest, and the targets these steps
# measure; CANONICAL=1 as for bench.
profile: setup
	mkdir -p $(BENCH_DIR)
	$(PY) -m benchmarks.profile_step --json $(BENCH_OUT)-profile.json $(PROFILE_ARGS)
	$(if $(CANONICAL),$(PY) -m benchmarks.report $(BENCH_OUT)-profile.json --canonical)

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info fused/_C*.so
