# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, merge the built-in demo models
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU, a CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CPU_TORCH ?= torch==2.13.0

# The tab's second gradio line, A1111 v1.10's: gradio 3.41.2 with its pins, in its own venv.
# (Three steps: in one, pip's resolver backtracks for many minutes.)
G3_VENV ?= .venv-g3
G3_PY := $(G3_VENV)/bin/python
G3_STAMP := $(G3_VENV)/.installed

.PHONY: demo test bench clean

demo: $(STAMP)
	$(PY) -m mergers demo

test: $(STAMP) $(G3_STAMP)
	SUPERMERGER_GRADIO3_PYTHON=$(G3_PY) $(PY) -m pytest -q

$(STAMP): requirements.txt requirements-dev.txt
	@# A torch the base Python already has is reused, never reinstalled.
	@test -x $(PY) || { if $(PYTHON) -c "import torch" 2>/dev/null; \
		then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; \
		then $(PY) -m pip install -q "torch>=2.1,<3"; else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; }
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

$(G3_STAMP): Makefile
	@test -x $(G3_PY) || $(PYTHON) -m venv $(G3_VENV)
	@$(G3_PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; \
		then $(G3_PY) -m pip install -q "torch>=2.1,<3"; else $(G3_PY) -m pip install -q "$(CPU_TORCH)"; fi; }
	$(G3_PY) -m pip install -q gradio==3.41.2 safetensors numpy tqdm Pillow pytest
	$(G3_PY) -m pip install -q fastapi==0.94.0 "pydantic<2" httpx==0.24.1
	@touch $(G3_STAMP)

clean:
	rm -rf $(VENV) $(G3_VENV) demo
