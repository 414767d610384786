"""The package layout tells the data flow, and no import runs against it.

Layers, lowest first: ``settings`` / ``resources`` / ``files`` / ``audit`` (everything records
into the audit trail) -> ``dicom`` (reading series, writing objects, the network edge) ->
``pipelines`` (inference) -> ``node`` (receive ... push) -> ``app``; beside the node,
``research`` (simulator, training) and ``demo``; ``cli`` on top. A module may import its own
layer or lower ones, never a higher one; the node's flow never imports research.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dicomnode"

LAYER = {
    "__init__": 0, "settings": 0, "resources": 0, "files": 0, "audit": 0,
    "dicom": 1, "pipelines": 2, "node": 3, "app": 4, "research": 4, "demo": 5, "cli": 6,
}
# what a part may never import, whatever the layer numbers say
FORBIDDEN = {"node": {"research", "demo"}, "pipelines": {"research", "demo"},
             "dicom": {"research", "demo"}, "research": {"node", "app", "demo"}}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Functions over the limit, each with its reason; none may grow, and a new one fails the test.
LONG_FUNCTIONS = {
    # straight-line DICOM module builders: one attribute block after another
    ("dicom/write/pet.py", "build_derived_pet"): 92,
    ("dicom/write/seg.py", "build_seg"): 87,
    # one geometry check after another, each ending in a refusal with its reason
    ("dicom/volume.py", "_load_series"): 160,
    # one transaction whose steps must stay together (the durability order)
    ("node/spool.py", "store_instance"): 89,
    # research: a training loop and a phantom's organ table, read top to bottom
    ("research/train_pet_denoise.py", "train"): 171,
    ("research/train_ct2pet.py", "train_ct2pet"): 123,
    ("research/phantom.py", "whole_body"): 122,
    ("cli/research.py", "train_pet_denoise"): 102,
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "dicomnode" and len(bits) > 1 and bits[1] in LAYER:
                parts.add(bits[1])
    return parts


def test_every_top_level_part_has_a_layer() -> None:
    parts = {_part(p) for p in _modules()}
    assert parts <= set(LAYER), f"give these a layer: {parts - set(LAYER)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_against_the_flow(path: Path) -> None:
    src = _part(path)
    bad = sorted(dst for dst in _imported_parts(path) - {src}
                 if LAYER[dst] > LAYER[src] or dst in FORBIDDEN.get(src, set()))
    assert not bad, f"{path.relative_to(PACKAGE)} ({src}) imports {bad}"


def test_modules_are_small() -> None:
    big = {str(p.relative_to(PACKAGE)): n for p in _modules()
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_long_functions_are_the_known_ones_and_do_not_grow() -> None:
    found = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    found[(str(path.relative_to(PACKAGE)), node.name)] = length
    new = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    grown = {k: (LONG_FUNCTIONS[k], v) for k, v in found.items()
             if k in LONG_FUNCTIONS and v > LONG_FUNCTIONS[k]}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines: {new}"
    assert not grown, f"listed long functions grew (was, now): {grown}"
