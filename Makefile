# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv with the package installed if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean claims

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]' 2> $(VENV)/pip-install.log || (cat $(VENV)/pip-install.log; exit 1)
	$(PY) -c "import personalize, diffusers, peft, open_clip" 
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/personalize demo --out demo_out

# The suite runs in one process per core (pytest-xdist); conftest.py keeps each file's module fixtures in one process
# and starts the slowest files first. `make test TEST_PROCESSES=0` runs it in this process alone.
TEST_PROCESSES ?= auto

test: install
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The Perfusion claims decided on 4 concepts x 4 training seeds (~30 min on 2 cores; not part of `make test`)
claims: install
	PERSONALIZE_CLAIMS=1 $(PY) -m pytest -q tests/test_toyworld_claims.py

clean:
	rm -rf demo_out .pytest_cache
