# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build from local disk on the dev machines; GPU users: make setup TORCH_SPEC='torch==2.x.y'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.veridraft-setup

.PHONY: setup setup-llamacpp setup-llama-server setup-kvpress demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/veridraft models kernels
	touch $(STAMP)

# llama-cpp-python for the llamacpp:* peers of `veridraft bench`. Not -march=native: that build
# dies with "Illegal instruction" on Intel Xeons with AMX. The AVX-512 build runs on any AVX-512
# CPU; CPUs without AVX-512 (it would die there too) get the AVX2 build.
LLAMACPP_AVX512 = -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
	-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMACPP_AVX2 = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMACPP_CMAKE_ARGS ?= $(if $(shell grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && echo y),\
	$(LLAMACPP_AVX512),$(LLAMACPP_AVX2))

# --force-reinstall rebuilds a llama-cpp-python already built with other flags; --no-deps keeps
# it from reinstalling numpy, whose other dependencies the second line adds.
setup-llamacpp: setup
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PY) -m pip install --no-cache-dir --force-reinstall \
		--no-deps 'llama-cpp-python>=0.2.90'
	$(PY) -m pip install --quiet 'llama-cpp-python>=0.2.90'

# llama.cpp's own llama-server, the peer of `veridraft serve` in `veridraft loadtest`: built from
# the llama.cpp vendored in llama-cpp-python's source distribution, with the CPU flags above,
# into $(VERIDRAFT_HOME)/bin/llama-server (about 15 minutes on two busy cores; again only when
# the version or the flags change). Needs cmake and a C++ compiler (apt-get install cmake g++).
LLAMA_SERVER_VERSION ?= 0.3.36
setup-llama-server: setup
	VERIDRAFT_HOME="$(VERIDRAFT_HOME)" $(PY) -m veridraft.serve.llama_server \
		--package-version $(LLAMA_SERVER_VERSION) --cmake-args "$(LLAMACPP_CMAKE_ARGS)" --jobs 2

# kvpress for the kvpress:* peers of `veridraft bench`. kvpress 0.5.5 needs transformers < 5.3,
# older than ours, so it gets a venv of its own; that venv sees this one's torch through a .pth
# file (its own transformers comes first on sys.path), and the bench runs it as a subprocess.
# Its own `kernels` too: transformers 5.2 imports whichever it finds, and the newer one this venv
# gets with transformers 5.x has an API it predates ("Either a revision or a version must be
# specified" at import).
VERIDRAFT_HOME ?= $(HOME)/.cache/veridraft
KVPRESS_VENV ?= $(VERIDRAFT_HOME)/peers/kvpress
KVPRESS_PACKAGES = kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 huggingface_hub==1.33.0 \
	typer-slim==0.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
	pyarrow==26.0.1 pandas==2.3.3 pytz==2026.6 six==1.17.0 peft==0.21.2 fire==0.6.0 \
	termcolor==3.3.0 cachetools==5.5.2 httpx==0.28.1 httpcore==1.0.9 kernels==0.12.3

setup-kvpress: setup
	test -x $(KVPRESS_VENV)/bin/python || $(PY) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --no-deps $(KVPRESS_PACKAGES)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(KVPRESS_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/veridraft-base.pth"
	$(KVPRESS_VENV)/bin/python -c "import torch, transformers, kvpress; print('kvpress', kvpress.__name__, 'transformers', transformers.__version__, 'torch', torch.__version__)"

demo: setup
	$(VENV)/bin/veridraft generate "Explain in three sentences why the sky is blue." --model smollm2-135m --max-new-tokens 96 --stats

test: setup
	$(VENV)/bin/veridraft models pull smollm2-135m
	$(VENV)/bin/veridraft models pull gemma3-270m
	$(VENV)/bin/veridraft models pull qwen2.5-coder-0.5b
	$(VENV)/bin/veridraft models pull qwen2.5-coder-1.5b
	$(PY) -m pytest -q --durations=15

# The edit-test loop: everything not marked slow (see the README's testing section).
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=10

# lint-imports checks the layering in pyproject.toml ([tool.importlinter]) of this checkout's src.
lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	PYTHONPATH=src $(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
