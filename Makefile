# Quick start:  make study   (set up, then run the study on the embedded digits default)
#               make test    (set up, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= study
LATEST ?= .venv-latest

.PHONY: study test stats venv lock test-latest latest-venv clean
# The venv holds exactly the versions of requirements.lock, the ones the tests last passed with.
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c requirements.lock
	touch $@
# the test-only extras (pytest; diffusers and pytorch-fid, the reference oracles) on top
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt -c requirements.lock
	touch $@

# The whole study on the embedded digits default; a rerun resumes.
study: venv
	$(PY) study.py --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

# The readability budgets (issue 29): lines, prose, line width, imports.
stats:
	$(PYTHON) benchmarks/stats.py

# A new venv from the ranges of requirements*.txt alone: the newest versions they allow.
latest-venv:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -r requirements-test.txt

# Pin the newest versions into requirements.lock (after editing requirements*.txt, or to take new releases), then
# run `make test` and commit the lock only if it passes.
lock: latest-venv
	{ echo "# Exact versions for make venv / make test, written by make lock: pip freeze of requirements-test.txt's"; \
	  echo "# newest versions ($$($(LATEST)/bin/python -c 'import platform as p; print(p.python_version(), p.system(), p.machine())'))."; \
	  $(LATEST)/bin/python -m pip freeze; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

# The install smoke tests (plus the quick study) on the newest versions; not part of make test.
test-latest: latest-venv
	$(LATEST)/bin/python -m pip freeze | grep -iE '^(torch|torchvision|triton|transformers|diffusers|kernels|huggingface.hub|numpy)=='
	$(LATEST)/bin/python -m pytest -q tests/test_install.py tests/test_study.py::test_quick_study_writes_every_section_with_numbers

clean:
	rm -rf $(VENV) $(LATEST)
