# The two set-up commands of the README. Each creates .venv when missing and
# installs what it needs, so a fresh clone needs only python3 (>= 3.10) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The main job: the paper's 2-D synthetic benchmark (Table 5, Figure 8), then
# one-class digits on scikit-learn's bundled 8x8 digits (no download).
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[plot]"
	$(BIN)/nonn demo --out demo_output

# The test suite (tests needing ../shared/data skip when it is absent). torch is
# pinned first: its CPU build (an unpinned `torch` may pull a multi-GB CUDA one).
test: $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,vision,distributed]"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_output build src/*.egg-info
