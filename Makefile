# Quick start:  make study   (set up, then run the study on the embedded digits default)
#               make test    (set up, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= study

.PHONY: study test venv clean
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@
# the test-only extras (pytest; diffusers and pytorch-fid, the reference oracles) on top
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# The whole study on the embedded digits default (10-14 minutes on a 2-core CPU); a rerun resumes.
study: venv
	$(PY) study.py --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
