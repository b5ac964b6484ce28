# Quick start:  make study   (set up, then run the study on the embedded digits default)
#               make test    (set up, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= study

.PHONY: study test venv clean
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Until the whole study exists, the main job is the stages that exist: poisoning the embedded default.
study: venv
	@for ratio in 0.01 0.05 0.1; do \
	  if [ -d $(OUT)/data/digits-badnets-$$ratio ]; then echo "skip: $(OUT)/data/digits-badnets-$$ratio exists"; \
	  else $(PY) poison.py --dataset digits --resolution 16 --ratio $$ratio --out $(OUT)/data/digits-badnets-$$ratio || exit 1; fi; \
	done

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
