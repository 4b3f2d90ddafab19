# The two commands of the README's quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-timm bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[data,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clusterformers reproduce --quick --out runs

test: $(STAMP)
	$(PY) -m pytest

# The timm integration runs in its own venv: timm needs torchvision, which pins its torch.
TIMM_VENV := .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed

$(TIMM_STAMP): pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" timm
	$(TIMM_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(TIMM_STAMP)

test-timm: $(TIMM_STAMP)
	$(TIMM_VENV)/bin/python -m pytest tests/test_integration_timm.py tests/test_readme.py

bench: $(STAMP)
	$(VENV)/bin/clusterformers bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(TIMM_VENV) runs .pytest_cache
