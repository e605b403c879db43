"""Point this interpreter's venv at the main venv: writes `synctalk_main.pth` into its site-packages so
the main venv's packages (torch, onnxruntime, numpy, av, aiortc, piper-tts, the editable synctalk install)
come after this venv's own (its protobuf 5+ and pipecat win), plus the integration folder itself.

    integrations/pipecat/.venv/bin/python integrations/pipecat/link_venv.py .venv
"""
from __future__ import annotations

import argparse
import logging
import sysconfig
from pathlib import Path

log = logging.getLogger("link_venv")


def write_pth(main_venv: Path, integration: Path) -> Path:
    """Write the .pth file and return its path."""
    main_site = Path(sysconfig.get_path("purelib", vars={"base": str(main_venv), "platbase": str(main_venv)}))
    if not main_site.is_dir():
        raise SystemExit(f"{main_site} not found: build the main venv first (make install)")
    pth = Path(sysconfig.get_path("purelib")) / "synctalk_main.pth"
    pth.write_text(f"import site; site.addsitedir({str(main_site)!r})\n{integration}\n")
    return pth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main_venv", type=Path, help="the project's venv (.venv)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pth = write_pth(args.main_venv.resolve(), Path(__file__).resolve().parent)
    log.info("wrote %s", pth)


if __name__ == "__main__":
    main()
