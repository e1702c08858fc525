"""The repository's shape: packages import only downward, and the project stands alone.

Layers, lowest first: ``data`` (loading, decoding, generating lines) < ``collator`` < ``dsocr`` (the core:
config, models, loading, generation, metrics, trainer) < the script folders (``train``, ``eval``, ``bench``
and any later one). A package may import its own layer and those below; script folders never import each
other. Every import counts, also those inside functions; only ``if TYPE_CHECKING:`` blocks (annotations,
never executed) are left out.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"data": 0, "collator": 1, "dsocr": 2}
SCRIPT_LAYER = 3
PROJECT_PACKAGES = set(LAYER)


def _packages() -> dict[str, int]:
    """Every top-level folder with Python files (tests excluded), with its layer."""
    out = {}
    for folder in sorted(p for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name in ("tests", "docs", "configs", "runs", "build") or folder.name.endswith(".egg-info"):
            continue
        if any(folder.rglob("*.py")):
            out[folder.name] = LAYER.get(folder.name, SCRIPT_LAYER)
    return out


def _runtime_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every import executed at some point (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _violations() -> list[str]:
    packages = _packages()
    problems = []
    for pkg, layer in packages.items():
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, target in _runtime_imports(path):
                if target not in packages or target == pkg:
                    continue
                where = f"{path.relative_to(REPO)}:{line} imports {target}"
                if packages[target] > layer:
                    problems.append(f"{where} (upward: layer {layer} -> {packages[target]})")
                elif layer == SCRIPT_LAYER and packages[target] == SCRIPT_LAYER:
                    problems.append(f"{where} (one script folder importing another)")
    return problems


def test_layers_are_known():
    packages = _packages()
    assert {"data", "collator", "dsocr", "train", "eval"} <= set(packages), packages
    assert packages["train"] == packages["eval"] == SCRIPT_LAYER


def test_imports_only_go_downward():
    assert _violations() == []


def test_the_checker_sees_an_upward_import():
    """The rule itself can fail: a core module importing a script folder is reported."""
    bad = REPO / "dsocr" / "_layout_probe.py"
    bad.write_text("def f():\n    from eval import eval_cer\n")
    try:
        assert any("_layout_probe.py:2 imports eval (upward" in v for v in _violations())
    finally:
        bad.unlink()


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    out = []
    for name in names:
        path = REPO / name
        if path.suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", "") and path.is_file():
            out.append(path)
    return out


def test_no_file_points_outside_the_project():
    # Assembled from pieces so that this file does not itself hold the paths it looks for.
    needles = tuple("".join(parts) for parts in ((".", "./shared"), ("REFERENCE", ".md"), ("/work", "/shared"),
                                                 ("/work", "/main")))
    hits = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        hits += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    assert hits == []


def test_every_docs_section_pointer_exists():
    """Docstrings cite ``docs/MODEL_NOTES.md §N``: every cited section must be a heading there."""
    import re

    notes = (REPO / "docs" / "MODEL_NOTES.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\.", notes, flags=re.M))
    cited = set()
    for path in _tracked_text_files():
        for ref in re.findall(r"MODEL_NOTES\.md (§[\d§, \-]+)", path.read_text(encoding="utf-8", errors="ignore")):
            cited.update(re.findall(r"§(\d+)", ref))
    assert cited, "no docstring cites the notes"
    assert cited <= sections, cited - sections
