# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, merge the built-in demo models
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU, a CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CPU_TORCH ?= torch==2.13.0

.PHONY: demo test bench clean

demo: $(STAMP)
	$(PY) -m mergers demo

test: $(STAMP)
	$(PY) -m pytest -q

$(STAMP): requirements.txt requirements-dev.txt
	@# A torch the base Python already has is reused, never reinstalled.
	@test -x $(PY) || { if $(PYTHON) -c "import torch" 2>/dev/null; \
		then $(PYTHON) -m venv --system-site-packages $(VENV); else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; \
		then $(PY) -m pip install -q "torch>=2.1,<3"; else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; }
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $(STAMP)

clean:
	rm -rf $(VENV) demo
