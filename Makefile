# `make demo` and `make test` work on a fresh machine: each creates or refreshes .venv first.
# Prerequisites: Python 3.11+, JDK 17+ and Maven (the embedded Kafka broker's jars come from
# Maven Central into ~/.m2 on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# faiss-cpu by default; `make GPU=1 ...` installs faiss-gpu instead (see pyproject.toml).
EXTRA  := $(if $(GPU),gpu,cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
ARGS   ?=

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRA),dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/streamrec demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis var
