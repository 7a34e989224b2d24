# fedmq: `make run` installs and runs the embedded federation; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the original data sets can be copied from when offline (torchvision layout); the
# sibling ../shared/data when it exists, else nothing (torchvision downloads).
export FEDMQ_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch and torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1), never resolved newer.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/fedmq run $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python bench/w1.py $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
