"""`synctalk_pipecat` is importable through the integration venv's .pth file (link_venv.py), so the
tests need no path set-up; this file marks the folder as the tests' root."""
