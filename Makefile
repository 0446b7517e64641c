# Two commands do all the set-up on a fresh machine (Python >= 3.11 on PATH as python3, or PYTHON=...):
#   make run    install into .venv and train the embedded default (class-conditional 8x8 digits, a few minutes on a
#               CPU); it writes checkpoints, TensorBoard logs, sample grids and the digits metrics to workdirs/digits
#               (run it again to resume; delete the directory to start over)
#   make test   install into .venv and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m diffax.main --config configs/digits.py --workdir workdirs/digits

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=25 tests

clean:
	rm -rf $(VENV)
