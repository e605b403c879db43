# The README's two commands: `make run` (server) and `make test` (tests). Everything they need is
# installed here, so a fresh clone on a fresh machine gets there with nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint install install-dev system-deps docs bench clean pipecat

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

# The Pipecat integration's own venv (Pipecat needs protobuf >= 5, mediapipe here needs 4.x). It reuses
# the main venv's packages through a .pth file and installs only Pipecat's (integrations/pipecat).
PIPECAT_VENV  := integrations/pipecat/.venv
PIPECAT_PY    := $(PIPECAT_VENV)/bin/python
PIPECAT_STAMP := $(PIPECAT_VENV)/.installed

$(PIPECAT_STAMP): integrations/pipecat/requirements.txt integrations/pipecat/link_venv.py | $(STAMP)
	$(PY) -m venv $(PIPECAT_VENV)
	$(PIPECAT_PY) integrations/pipecat/link_venv.py $(VENV)
	$(PIPECAT_PY) -m pip install --quiet --ignore-installed "protobuf>=5.29.6,<7"
	$(PIPECAT_PY) -m pip install --quiet -r integrations/pipecat/requirements.txt
	touch $@

pipecat: $(PIPECAT_STAMP)

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

test: $(DEVSTAMP) $(PIPECAT_STAMP) system-deps lint
	$(PY) -m pytest -q
	$(PIPECAT_PY) -m pytest -q integrations/pipecat/tests

docs:
	@command -v plantuml >/dev/null 2>&1 || { echo "plantuml not installed: apt-get install plantuml"; exit 2; }
	plantuml -tpng docs/diagrams/*.puml
	plantuml -tsvg docs/diagrams/*.puml

bench: $(DEVSTAMP)
	$(PY) bench/models.py

clean:
	rm -rf $(VENV) .pytest_cache
