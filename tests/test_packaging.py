"""pyproject.toml against the code: every import declared, every declaration used, every floor readable.

The floors themselves are checked by tools/check_min_versions.py (it installs them, so it is not run here);
these tests keep the declarations it reads honest without a download.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

pytest.importorskip("tomllib")  # the checker reads pyproject.toml with it (Python >= 3.11)

REPO = Path(__file__).resolve().parents[1]

# Declared dependencies that src/vader never imports by name, each with the reason it is still needed.
INDIRECT = {
    "tensorboard": "accelerate's tracker for logger_type='tensorboard'",
    "torchvision": "the transformers image processors and open_clip's transforms",
}
# Declared only for the tests or the tooling, not for the package.
TOOLING = {"pytest", "ruff"}

# Calls in src/vader that older releases reject, each seen failing there by tools/check_min_versions.py:
# (called name or "*" for any, keyword, distribution, lowest release that accepts it, what the old one said).
API_FLOORS = [
    ("from_pretrained", "dtype", "transformers", "4.56",
     "4.45: T5EncoderModel.__init__() got an unexpected keyword argument 'dtype'"),
    ("*", "return_dict", "transformers", "5.0",
     "4.56/4.57: CLIPVisionTransformer.forward() got an unexpected keyword argument 'return_dict'"),
    ("inject_adapter_in_model", "low_cpu_mem_usage", "peft", "0.13",
     "0.12: inject_adapter_in_model() got an unexpected keyword argument 'low_cpu_mem_usage'"),
]


def _checker():
    spec = importlib.util.spec_from_file_location("check_min_versions", REPO / "tools" / "check_min_versions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_min_versions", module)
    spec.loader.exec_module(module)
    return module


def _declared() -> tuple[set[str], set[str]]:
    """(runtime distributions, optional-extra distributions), canonical names."""
    import tomllib

    checker = _checker()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(specs: list[str]) -> set[str]:
        return {checker.canonical(spec.split(">=")[0].split("[")[0].strip()) for spec in specs}

    extras = set().union(*(names(specs) for specs in project.get("optional-dependencies", {}).values()))
    return names(project["dependencies"]), extras


def _imports() -> dict[str, set[str]]:
    """{distribution: {modules}} for the third-party modules src/vader imports, nested imports included."""
    checker = _checker()
    owners = packages_distributions()
    out: dict[str, set[str]] = {}
    for module in checker.third_party_imports(REPO / "src" / "vader"):
        top = module.split(".")[0]
        for dist in owners.get(top, [top]):
            out.setdefault(checker.canonical(dist), set()).add(module)
    return out


def test_every_third_party_import_is_a_declared_dependency() -> None:
    runtime, extras = _declared()
    undeclared = {dist: mods for dist, mods in _imports().items() if dist not in runtime | extras}
    assert not undeclared, f"imported by src/vader but not in pyproject.toml: {undeclared}"


def test_top_level_imports_need_no_optional_extra() -> None:
    """A module-level import of an extra (wandb, bitsandbytes) would break `import vader` without it."""
    import ast

    runtime, extras = _declared()
    owners = packages_distributions()
    checker = _checker()
    bad = []
    for file in sorted((REPO / "src" / "vader").rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: imports inside functions run when the feature is used
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                dists = {checker.canonical(d) for d in owners.get(top, [top])}
                if dists & extras and not dists & runtime:
                    bad.append(f"{file.relative_to(REPO)}: import {module}")
    assert not bad, bad


def test_every_declared_runtime_dependency_is_used() -> None:
    runtime, _ = _declared()
    unused = runtime - set(_imports()) - set(INDIRECT)
    assert not unused, f"declared in pyproject.toml but never imported by src/vader: {sorted(unused)}"


def test_every_dependency_has_a_readable_floor(tmp_path) -> None:
    checker = _checker()
    floors = checker.floors(REPO / "pyproject.toml")
    runtime, _ = _declared()
    assert runtime | TOOLING <= set(floors)
    checker.write_constraints(floors, tmp_path / "c.txt")
    lines = (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()
    assert f"transformers=={floors['transformers']}" in lines
    assert all(line.count("==") == 1 for line in lines)


def test_floor_reader_refuses_what_it_cannot_pin(tmp_path) -> None:
    checker = _checker()
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch>=2.2", "numpy<3"]\n')
    with pytest.raises(SystemExit, match="numpy<3"):
        checker.floors(tmp_path / "pyproject.toml")


def test_import_scan_sees_imports_inside_functions() -> None:
    """The floor check must reach the lazy imports no smoke test runs (the hub download path)."""
    found = _checker().third_party_imports(REPO / "src" / "vader")
    assert "hf_hub_download" in found["huggingface_hub"]
    assert {"EntryNotFoundError", "GatedRepoError"} <= found["huggingface_hub.errors"]
    assert not any(module.split(".")[0] in ("vader", "os", "json") for module in found)


def test_override_below_the_floor_is_installable(tmp_path) -> None:
    """Bisecting below a declared floor needs the copy's floor lowered too, or pip refuses the pin."""
    checker = _checker()
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\ndependencies = ["diffusers>=0.30", "open_clip_torch>=2.24", "av>=12"]\n'
                    '[project.optional-dependencies]\ntest = ["pytest>=8"]\n')
    checker.relax_floors(path, {"diffusers": "0.29.2", "open-clip-torch": "2.23.0"})
    assert checker.floors(path) == {"diffusers": "0.29.2", "open-clip-torch": "2.23.0", "av": "12", "pytest": "8"}


def _calls_with_keyword(func: str, keyword: str) -> list[str]:
    import ast

    found = []
    for file in sorted((REPO / "src" / "vader").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or keyword not in {kw.arg for kw in node.keywords}:
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if func in ("*", name):
                found.append(f"{file.relative_to(REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize(("func", "keyword", "dist", "minimum", "old_error"), API_FLOORS,
                         ids=[f"{dist}-{keyword}" for _, keyword, dist, _, _ in API_FLOORS])
def test_declared_floor_accepts_the_calls_the_code_makes(func, keyword, dist, minimum, old_error) -> None:
    """Issue 7: `transformers>=4.45` was declared while the loaders passed `dtype=`, which 4.45 rejects."""
    from packaging.version import Version

    sites = _calls_with_keyword(func, keyword)
    assert sites, f"no {func}(..., {keyword}=...) left in src/vader: drop this API_FLOORS entry"
    floor = _checker().floors(REPO / "pyproject.toml")[dist]
    assert Version(floor) >= Version(minimum), (
        f"pyproject declares {dist}>={floor}, but {sites[0]} passes {keyword}= which needs {dist}>={minimum} "
        f"({old_error})")
