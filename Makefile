# One virtualenv per dependency spec (hash of pyproject.toml), kept outside the clone so that CI runs
# and later checkouts reuse it. The venv holds only the dependencies; imgmw and apps run from this
# checkout through PYTHONPATH.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SPEC_HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
VENV ?= $(HOME)/.cache/imgmw/venv-$(SPEC_HASH)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: demo lint test test-fast bench venv notebooks

# $(1): stamp name, $(2): extras
define install_step
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PYTHON) .ci/requirements.py $(2) > $(VENV)/requirements-$(1).txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements-$(1).txt
	@touch $(VENV)/.installed-$(1)
endef

$(VENV)/.installed-base:
	$(call install_step,base,plots)

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install --quiet --no-deps "python-color-transfer==0.1.2a0"
	$(call install_step,test,plots test)

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(call install_step,bench,plots test bench)

venv: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(PY) -m apps.texture_synth

# Static checks, part of `make test`: ruff over the tree and mypy over imgmw/ and apps/ (settings in pyproject.toml).
lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m mypy imgmw apps

# pytest exits 5 when it collected nothing: that must never pass.
test: lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Rebuild every walkthrough notebook from notebooks/src/ and store it executed at full size (a few minutes each).
notebooks: $(VENV)/.installed-test
	$(PY) notebooks/build.py
