"""The documentation matches the code: endpoints, CLI flags, parameter counts, shapes and crop geometry.

- every route of `api.create_app()` (the OpenAPI paths, the page routes and the WebSocket `/ws/live`,
  which OpenAPI does not list) appears with its method in docs/api-reference.md;
- every `--flag` of every CLI script appears in that script's guide (or the README);
- the parameter counts, block shapes and FLOPs quoted in docs/model-details.md equal what the code
  reports; the crop-geometry numbers equal `face_crop.mask_rect` and `utils.SIZE_PRESETS`;
- the README links rendered diagrams that exist, one per PlantUML source.
"""
from __future__ import annotations

import argparse
import importlib
import re

import pytest
from conftest import REPO

DOCS = REPO / "docs"
FRAMEWORK_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

# script module -> (function that builds or parses its arguments, the guide pages that document it)
SCRIPTS = {
    "inference_328": ("parse_args", ["inference.md"]),
    "train_328": ("build_parser", ["training-guide.md"]),
    "synctalk.train_syncnet": ("build_parser", ["training-guide.md"]),
    "data_utils.process": ("build_parser", ["preprocessing.md"]),
    "data_utils.audio_features": ("parse_args", ["data-flow.md"]),
    "data_utils.synth_talker": ("main", ["synthetic-talker.md"]),
    "evaluate": ("build_parser", ["evaluation.md"]),
    "api": ("main", ["api-reference.md"]),
}


def read(name: str) -> str:
    return (REPO / name).read_text() if name == "README.md" else (DOCS / name).read_text()


def mentions(text: str, token: str) -> bool:
    """`token` occurs in `text` as a whole word (not as part of a longer flag or path)."""
    return re.search(r"(?<![\w-])" + re.escape(token) + r"(?![\w-])", text) is not None


# ----------------------------------------------------------------------------------------------
# Endpoints


def app_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, descending into included routers (FastAPI >= 0.16x keeps them
    nested); WebSocket routes get the method `WS`."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            found += app_routes(inner.routes, prefix + (getattr(context, "prefix", "") or ""))
            continue
        path = getattr(route, "path", None)
        if path is None or path in FRAMEWORK_ROUTES:
            continue
        methods = getattr(route, "methods", None)
        if methods:
            found += [(m, prefix + path) for m in sorted(methods) if m != "HEAD"]
        else:  # a WebSocket route has no methods
            found.append(("WS", prefix + path))
    return found


@pytest.fixture(scope="module")
def app():
    import api

    return api.create_app()


def test_every_endpoint_is_in_the_api_reference(app):
    text = read("api-reference.md")
    routes = app_routes(app.routes)
    schema_paths = set(app.openapi()["paths"])
    listed = {path for _, path in routes}
    assert schema_paths <= listed, f"OpenAPI paths not found among the routes: {schema_paths - listed}"
    assert ("WS", "/ws/live") in routes
    missing = [f"{method} {path}" for method, path in routes
               if not re.search(rf"\b{method}\b[\s|`]*{re.escape(path)}(?![\w/{{-])", text)]
    assert not missing, f"routes missing from docs/api-reference.md (as 'METHOD `path`'): {missing}"


# ----------------------------------------------------------------------------------------------
# CLI flags


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def script_parser(module_name: str, entry: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's argparse parser, without running the script: `build_parser()` when it has one, else
    its parse/main function is called with `parse_args` patched to hand the parser back."""
    module = importlib.import_module(module_name)
    func = getattr(module, entry)
    if entry == "build_parser":
        return func()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as info:
        func([])
    return info.value.parser


@pytest.mark.parametrize("module_name", sorted(SCRIPTS))
def test_every_cli_flag_is_documented(module_name, monkeypatch):
    entry, pages = SCRIPTS[module_name]
    parser = script_parser(module_name, entry, monkeypatch)
    flags = [opt for action in parser._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"]
    assert flags, f"{module_name}: no flags found"
    text = "\n".join(read(p) for p in pages + ["README.md"])
    missing = [f for f in flags if not mentions(text, f)]
    assert not missing, f"{module_name} flags missing from {', '.join(pages)} and README.md: {missing}"


# ----------------------------------------------------------------------------------------------
# docs/model-details.md


def sections(text: str) -> dict[str, str]:
    """`## heading` -> the section's text."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables of `text`: rows of stripped cells (separator rows dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def clean(cell: str) -> str:
    return cell.replace("`", "").strip()


def number(cell: str) -> int:
    return int(clean(cell).replace(",", ""))


def table_with_header(text: str, first: str) -> list[list[str]]:
    matches = [t for t in tables(text) if clean(t[0][0]).lower() == first]
    assert len(matches) == 1, f"expected one table whose first column is {first!r}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def model_details() -> dict[str, str]:
    return sections(read("model-details.md"))


def parameter_table(section: str) -> dict[tuple[str, str], int]:
    rows = table_with_header(section, "mode")
    sizes = [clean(c) for c in rows[0][1:]]
    assert sizes == ["328", "small"], sizes
    return {(clean(row[0]), size): number(cell) for row in rows[1:] for size, cell in zip(sizes, row[1:])}


@pytest.mark.parametrize("network", ["Generator U-Net", "SyncNet"])
def test_parameter_counts_equal_the_code(network, model_details):
    from syncnet_328 import build_syncnet
    from unet_328 import build_unet
    from utils import AUDIO_MODES, count_parameters

    build = build_unet if network == "Generator U-Net" else build_syncnet
    quoted = parameter_table(model_details[network])
    assert {mode for mode, _ in quoted} == set(AUDIO_MODES)
    actual = {key: count_parameters(build(*key)) for key in quoted}
    assert quoted == actual


def test_audio_encoder_counts_equal_the_code(model_details):
    from synctalk.features import WhisperEncoder
    from utils import AudioEncoder, count_parameters

    text = model_details["Audio encoders"]
    quoted = {name: number(m.group(1)) for name, m in
              (("whisper", re.search(r"Whisper tiny\.en encoder.*?([\d,]{7,}) parameters", text, re.S)),
               ("ave", re.search(r"AVE encoder.*?([\d,]{7,}) parameters", text, re.S)))}
    assert quoted == {"whisper": count_parameters(WhisperEncoder()), "ave": count_parameters(AudioEncoder())}


def shape(cell: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", cell))


def test_unet_block_shapes_params_and_flops(model_details):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unet_328 import build_unet
    from utils import count_parameters

    text = model_details["Generator U-Net"]
    rows = table_with_header(text, "block")
    assert [clean(c) for c in rows[0][1:]] == ["328 output", "328 parameters", "small output",
                                                    "small parameters"]
    for col, size in ((1, "328"), (3, "small")):
        net = build_unet("whisper", size).eval()
        outputs: dict[str, tuple[int, ...]] = {}
        hooks = [getattr(net, clean(row[0])).register_forward_hook(
            lambda mod, inp, out, name=clean(row[0]): outputs.__setitem__(name, tuple(out.shape[1:])))
            for row in rows[1:]]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(*net.example_inputs(1))
        for h in hooks:
            h.remove()
        for row in rows[1:]:
            name = clean(row[0])
            assert shape(row[col]) == outputs[name], (size, name)
            assert number(row[col + 1]) == count_parameters(getattr(net, name)), (size, name)
        assert sum(number(row[col + 1]) for row in rows[1:]) == count_parameters(net)
        gflops = re.search(rf"([\d.]+) G \(`whisper`, `{size}`\)", text)
        assert gflops, f"FLOPs for whisper/{size} not quoted"
        assert float(gflops.group(1)) == pytest.approx(counter.get_total_flops() / 1e9, abs=0.0015)


def test_syncnet_embedding_shapes(model_details):
    import torch

    from syncnet_328 import build_syncnet

    rows = table_with_header(model_details["SyncNet"], "tower")
    for col, size in ((1, "328"), (2, "small")):
        net = build_syncnet("whisper", size).eval()
        face, audio = net.example_inputs(1)
        with torch.no_grad():
            actual = {"face_encoder": tuple(net.face_encoder(face).shape[1:]),
                      "audio_encoder": tuple(net.audio_encoder(audio).shape[1:])}
        assert {clean(row[0]): shape(row[col]) for row in rows[1:]} == actual


def test_crop_geometry_equals_the_code(model_details):
    from synctalk.face import mask_rect
    from utils import SIZE_PRESETS

    rows = table_with_header(model_details["Crop geometry"], "preset")
    header = [clean(c) for c in rows[0]]
    assert header == ["preset", "crop", "border", "model input", "mask rect (x, y, w, h)"]
    assert {clean(row[0]) for row in rows[1:]} == set(SIZE_PRESETS)
    for row in rows[1:]:
        preset = SIZE_PRESETS[clean(row[0])]
        assert (number(row[1]), number(row[2]), number(row[3])) == (preset.crop, preset.border, preset.inner)
        assert shape(row[4]) == mask_rect(preset.inner)


# ----------------------------------------------------------------------------------------------
# Diagrams


def test_readme_links_a_rendered_image_of_every_diagram():
    readme = read("README.md")
    sources = sorted((DOCS / "diagrams").glob("*.puml"))
    assert len(sources) >= 6
    for source in sources:
        link = f"docs/diagrams/{source.stem}.png"
        assert link in readme, f"README does not link {link}"
        rendered = source.with_suffix(".png")
        assert rendered.is_file() and rendered.stat().st_size > 1000, f"{rendered} is not rendered"
    for target in re.findall(r"\]\(((?:docs/)[^)#\s]+)", readme):
        assert (REPO / target).exists(), f"README links a missing file: {target}"
