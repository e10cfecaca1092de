"""Install anywhere: every import is a declared dependency, every package of ``ldm`` ships, and the bundled files
(configs, the demo model) are found through :mod:`ldm.bundled` in the source tree and in an installed wheel."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

from ldm.bundled import bundled_path, bundled_root

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> dict[str, bool]:
    """Top-level module names imported by a file -> whether every import of it is guarded by
    ``except ImportError`` (an optional dependency)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    guarded_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            for inner in node.body:
                guarded_nodes.update(id(n) for n in ast.walk(inner))
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, True) and id(node) in guarded_nodes
    return found


def declared() -> dict[str, set[str]]:
    """Distribution names (normalised) required by the installed sdgen: "" = runtime, else the extra."""
    out: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("sdgen") or []:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
        extra = re.search(r'extra\s*==\s*"([^"]+)"', requirement)
        out.setdefault(extra.group(1) if extra else "", set()).add(normalise(name))
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_is_a_declared_dependency():
    """ldm's imports are runtime dependencies (optional ones, guarded by except ImportError, an extra); the tests'
    imports are runtime dependencies or the ``test`` extra. Nothing the machine merely happens to have."""
    deps = declared()
    runtime, test = deps.get("", set()), deps.get("test", set())
    extras = set().union(*(v for k, v in deps.items() if k))
    owners = importlib.metadata.packages_distributions()
    local = {"ldm", "tests", "__future__"}
    problems = []
    for folder, allowed in (("ldm", runtime), ("tests", runtime | test)):
        for path in sorted((REPO / folder).rglob("*.py")):
            for module, optional in imported_modules(path).items():
                if module in local or module in sys.stdlib_module_names:
                    continue
                dists = {normalise(d) for d in owners.get(module, [])}
                ok = allowed | (extras if optional and folder == "ldm" else set())
                if not dists & ok:
                    problems.append(f"{path.relative_to(REPO)} imports {module} ({', '.join(dists) or 'not installed'})")
    assert not problems, "undeclared imports: " + "; ".join(problems)


def test_the_wheel_lists_every_package_of_ldm():
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'^\s*"(ldm[\w.]*)",?$', text.split("packages = [", 1)[1].split("]", 1)[0], re.M))
    source = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ldm").rglob("__init__.py")}
    assert source <= listed, f"packages missing from pyproject.toml: {sorted(source - listed)}"
    assert listed - source == {"ldm._bundled.configs", "ldm._bundled.models.demo"}


def test_bundled_files_are_found_from_the_source_tree():
    assert bundled_root() in (REPO, REPO / "ldm" / "_bundled")
    for name in ("configs/stable-diffusion/v1-inference.yaml", "configs/sdxl/sd_xl_base.yaml",
                 "configs/sld/medium.yaml", "configs/demo/shapes-ldm.yaml", "models/demo/shapes-ldm.safetensors"):
        assert bundled_path(name).is_file(), name


def test_relative_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    """A relative --config / --ckpt is tried in the working directory first, then among the bundled files."""
    from ldm.model_files import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    files = resolve_checkpoint("models/demo/shapes-ldm.safetensors", "configs/demo/shapes-ldm.yaml")
    assert files.checkpoint == bundled_path("models/demo/shapes-ldm.safetensors").resolve()
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    own = tmp_path / "configs" / "demo" / "shapes-ldm.yaml"
    own.write_text(bundled_path("configs/demo/shapes-ldm.yaml").read_text())
    assert resolve_checkpoint("models/demo/shapes-ldm.safetensors", "configs/demo/shapes-ldm.yaml").config == own


@pytest.mark.parametrize("layout", ["wheel", "source"])
def test_bundled_root_in_both_layouts(tmp_path, monkeypatch, layout):
    """An installed wheel holds the files under ldm/_bundled; a checkout beside the package."""
    import importlib.resources

    import ldm.bundled as bundled

    package = tmp_path / "site" / "ldm"
    package.mkdir(parents=True)
    if layout == "wheel":
        (package / "_bundled" / "configs").mkdir(parents=True)
    else:
        (tmp_path / "site" / "configs").mkdir()
    monkeypatch.setattr(importlib.resources, "files", lambda name: package)
    bundled.bundled_root.cache_clear()
    try:
        expected = package / "_bundled" if layout == "wheel" else tmp_path / "site"
        assert bundled.bundled_root() == expected
    finally:
        monkeypatch.undo()
        bundled.bundled_root.cache_clear()
