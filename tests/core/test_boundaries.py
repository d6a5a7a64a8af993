"""The architecture, checked: which package may import which, and no module reaches into another's
private names. The rooms, lowest first:

    kernels   torch only
    modeling  kernels (and torch, transformers, safetensors)
    engine    modeling, kernels, data_pipeline (and DeepSpeed)
    eval      engine, modeling, kernels, data_pipeline
    data_pipeline never imports hycam_ds; launch/ may import everything.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "kernels": {"kernels"},
    "modeling": {"modeling", "kernels"},
    "engine": {"engine", "modeling", "kernels"},
    "eval": {"eval", "engine", "modeling", "kernels"},
}


def _loaded_after(statement: str) -> set[str]:
    """Top-level module names in sys.modules after `statement` runs in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_public_api_imports_no_engine_data_pipeline_or_plotting():
    loaded = _loaded_after("import hycam_ds, hycam_ds.modeling, hycam_ds.kernels")
    for heavy in ("deepspeed", "data_pipeline", "yaml", "matplotlib", "hycam_ds.engine", "hycam_ds.eval"):
        assert heavy not in loaded, f"import hycam_ds pulls in {heavy}"


def test_every_modeling_and_kernels_module_stays_in_its_room():
    names = [
        f"hycam_ds.{room}.{p.stem}"
        for room in ("modeling", "kernels")
        for p in sorted((ROOT / "hycam_ds" / room).glob("*.py"))
        if p.stem != "__init__"
    ]
    loaded = _loaded_after("\n".join(f"import {n}" for n in names))
    for heavy in ("deepspeed", "data_pipeline", "matplotlib", "hycam_ds.engine", "hycam_ds.eval"):
        assert heavy not in loaded, f"a module of hycam_ds.modeling or hycam_ds.kernels pulls in {heavy}"


def test_data_pipeline_never_imports_hycam_ds():
    loaded = _loaded_after(
        "import importlib, pkgutil, data_pipeline\n"
        "for m in pkgutil.walk_packages(data_pipeline.__path__, 'data_pipeline.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert not [m for m in loaded if m.startswith("hycam_ds")]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import statement in a file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_the_rooms_below_it(room):
    wrong = []
    for path in _python_files(f"hycam_ds/{room}"):
        for module, _names, line in _imports(path):
            parts = module.split(".")
            if parts[0] == "hycam_ds" and len(parts) > 1 and parts[1] in {"modeling", "kernels", "engine", "eval"}:
                if parts[1] not in ALLOWED[room]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
            if parts[0] == "data_pipeline" and room in ("modeling", "kernels"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_data_pipeline_source_names_no_hycam_ds():
    wrong = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in _python_files("data_pipeline")
        for module, _, line in _imports(p)
        if module.split(".")[0] == "hycam_ds"
    ]
    assert not wrong


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in _python_files("hycam_ds", "data_pipeline", "launch"):
        for module, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != "__future__":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {module}")
    assert not wrong, "\n".join(wrong)
