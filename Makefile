# The README's two commands: `make run` (server) and `make test` (tests). Everything they need is
# installed here, so a fresh clone on a fresh machine gets there with nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint install install-dev system-deps docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): requirements.txt requirements-mediapipe.txt pyproject.toml | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-mediapipe.txt
	$(PIP) install --no-deps --no-build-isolation --quiet -e .
	touch $@

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

install: $(STAMP)
install-dev: $(DEVSTAMP)

# Debian packages: espeak-ng (TTS fallback), chromium (browser tests), sox (test audio). Best effort:
# tests that need a missing one skip with the reason.
system-deps:
	@missing=""; \
	for pair in espeak-ng:espeak-ng chromium:chromium sox:sox; do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing) \
	    || echo "warning: could not install$$missing; the tests that need them will skip"; \
	fi

run: $(STAMP)
	$(PY) api.py

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(DEVSTAMP) system-deps lint
	$(PY) -m pytest -q

docs:
	@command -v plantuml >/dev/null 2>&1 || { echo "plantuml not installed: apt-get install plantuml"; exit 2; }
	plantuml -tpng docs/diagrams/*.puml
	plantuml -tsvg docs/diagrams/*.puml

bench: $(DEVSTAMP)
	$(PY) bench/models.py

clean:
	rm -rf $(VENV) .pytest_cache
