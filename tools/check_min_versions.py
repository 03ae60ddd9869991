#!/usr/bin/env python3
"""Install the declared minimum of every dependency in a fresh venv and run a smoke test there.

A `>=` floor in pyproject.toml is a promise that nothing in the normal test suite checks: the dev venv
always resolves to the newest releases. This script checks it, by hand or from a CI job (it downloads
about 3 GB, torch 2.2 with its CUDA libraries, so it is not part of `pytest`):

    python3 tools/check_min_versions.py                      # venv /tmp/minvenv (kept and reused)
    python3 tools/check_min_versions.py --python python3.10  # the oldest Python requires-python allows
    python3 tools/check_min_versions.py --venv /tmp/v2 --override transformers==4.57.6   # bisect one package
    python3 tools/check_min_versions.py -- --deselect tests/test_x.py::test_y           # extra pytest args

Steps: (1) read [project].dependencies and the `test` extra from pyproject.toml and write a constraints
file that pins each one to its floor (`name==min`; `--override name==version` replaces one pin, for
bisecting); (2) create the venv if it does not exist and `pip install --upgrade -c constraints .[test]`
from a clean copy of the checkout (a regular install: the tests import the installed package, package
data included); (3) `pip check`; (4) check that every name src/vader imports from a third-party package
exists in the installed versions, the imports inside functions that no smoke test reaches included;
(5) `ruff check` with the oldest ruff the `test` extra allows; (6) the smoke tests with HF_HUB_OFFLINE=1,
a subset that goes through transformers, diffusers, peft, accelerate, open_clip, huggingface_hub,
safetensors and av. Exit status 0 only when every step passed. A run takes 2-5 minutes on 2 cores once
the downloads are cached.

Uses only the standard library (Python >= 3.11 for tomllib) so that it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]

# Each file is here for the packages it exercises with real calls (not only imports):
#   test_text: transformers T5 from_pretrained/save_pretrained, tokenizers, huggingface_hub cache lookups
#   test_reward_models: transformers CLIP, open_clip HPS, huggingface_hub, safetensors
#   test_actpred: transformers VideoMAE from_pretrained and image processor
#   test_vae: diffusers AutoencoderKL;  test_loading: safetensors, load_state_dict(assign=True), hub cache
#   test_checkpoint: peft inject/get/set adapter state, PeftModel.from_pretrained on the saved folder
#   test_inspect: peft inject_adapter_in_model(low_cpu_mem_usage=True) on a meta-device model (peft >= 0.13)
#   test_media: av encode/decode;  test_train: accelerate end to end (single process), every piece together
#   test_cli: the installed `vader` entry point in subprocesses
#   test_multiprocess: accelerate's multi-process launch, gather and gradient all-reduce (2 CPU processes, ~15 s)
SMOKE_TESTS = [
    "tests/test_config.py",
    "tests/test_text.py",
    "tests/test_reward_models.py",
    "tests/test_actpred.py",
    "tests/test_vae.py",
    "tests/test_loading.py",
    "tests/test_checkpoint.py",
    "tests/test_inspect.py",
    "tests/test_media.py",
    "tests/test_train.py",
    "tests/test_cli.py",
    "tests/test_multiprocess.py",
]

# Not copied into the build tree: venvs, build outputs, caches, run folders.
SKIP_COPY = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
             "project_dir", "wandb")

# Import names whose absence is allowed: optional extras that are not installed by `.[test]`.
OPTIONAL_IMPORTS = {"bitsandbytes"}

# Distribution names whose import name differs (for the summary table only).
SHOWN = ["torch", "torchvision", "transformers", "diffusers", "peft", "accelerate", "huggingface_hub",
         "open_clip_torch", "safetensors", "av", "tokenizers", "timm", "numpy", "pytest"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path) -> dict[str, str]:
    """{distribution: minimum} for the runtime dependencies and the `test` extra."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("test", []))
    out: dict[str, str] = {}
    for spec in specs:
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*", spec)
        if match is None:
            # A floor that is not a plain `>=` cannot be pinned by this script; say so instead of guessing.
            raise SystemExit(f"check_min_versions: cannot read a '>=' floor from {spec!r} in {pyproject}")
        out[canonical(match.group(1))] = match.group(3)
    return out


def relax_floors(pyproject: Path, overrides: dict[str, str]) -> None:
    """Lower the `>=` floor of each overridden package in (a copy of) pyproject.toml to the override, so that
    a version below the declared floor can be installed to see what breaks there."""
    text = pyproject.read_text(encoding="utf-8")

    def lower(match: re.Match) -> str:
        version = overrides.get(canonical(match.group(1)))
        return match.group(0) if version is None else f'"{match.group(1)}{match.group(2) or ""}>={version}"'

    pyproject.write_text(re.sub(r'"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*[^",;\s]+"', lower, text),
                         encoding="utf-8")


def write_constraints(pins: dict[str, str], path: Path) -> None:
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())), encoding="utf-8")


def run(cmd: list[str], **kwargs) -> int:
    shown = [arg if len(arg) < 200 else arg[:40].strip() + " ..." for arg in cmd]
    print("+", " ".join(shown), flush=True)
    return subprocess.run(cmd, **kwargs).returncode


def third_party_imports(src: Path) -> dict[str, set[str]]:
    """{module: {names imported from it}} over every `import` / `from ... import` in src, nested ones too."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for file in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = {node.module: {alias.name for alias in node.names if alias.name != "*"}}
            elif isinstance(node, ast.Import):
                modules = {alias.name: set() for alias in node.names}
            else:
                continue
            for module, names in modules.items():
                top = module.split(".")[0]
                if top in stdlib or top in ("vader", "__future__"):
                    continue
                found.setdefault(module, set()).update(names)
    return found


IMPORT_CHECK = r"""
import importlib, json, sys
wanted, optional = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
bad = []
for module, names in sorted(wanted.items()):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if module.split(".")[0] not in optional:
            bad.append(f"import {module}: {exc}")
        continue
    for name in sorted(names):
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                bad.append(f"from {module} import {name}: missing")
print("\n".join(bad) if bad else f"all {sum(len(n) or 1 for n in wanted.values())} third-party imports resolve")
sys.exit(1 if bad else 0)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/minvenv"), help="venv to create or reuse")
    parser.add_argument("--override", action="append", default=[], metavar="NAME==VERSION",
                        help="replace one floor pin (repeatable), e.g. to bisect a package")
    parser.add_argument("--python", default=sys.executable, help="interpreter for a new venv")
    parser.add_argument("--no-tests", action="store_true", help="install and check imports only")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    pins = floors(REPO / "pyproject.toml")
    overrides: dict[str, str] = {}
    for item in args.override:
        name, sep, version = item.partition("==")
        if not sep or not version:
            parser.error(f"--override {item!r}: expected NAME==VERSION")
        overrides[canonical(name)] = version
    pins.update(overrides)
    constraints = args.venv.with_name(args.venv.name + "-constraints.txt")

    if not (args.venv / "bin" / "python").exists():
        if run([args.python, "-m", "venv", str(args.venv)]) != 0:
            return 1
    write_constraints(pins, constraints)
    print(f"constraints ({constraints}):\n" + constraints.read_text(encoding="utf-8"), flush=True)
    py = str(args.venv / "bin" / "python")
    # Built from a clean copy: setuptools would write build/ into the checkout (read-only in CI) and reuse
    # stale files from an earlier build/ there.
    with tempfile.TemporaryDirectory(prefix="vader-src-") as tmp:
        source = Path(tmp) / "vader"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SKIP_COPY))
        relax_floors(source / "pyproject.toml", overrides)
        # --upgrade so that a reused venv is moved to exactly the pins, down as well as up.
        if run([py, "-m", "pip", "install", "-q", "--upgrade", "-c", str(constraints), f"{source}[test]"]) != 0:
            print("check_min_versions: the floors do not install together (see pip's message above)")
            return 1
    failures = []
    if run([py, "-m", "pip", "check"]) != 0:
        failures.append("pip check")
    subprocess.run([py, "-c", "import importlib.metadata as m, sys\n"
                    "for d in sys.argv[1:]:\n"
                    "    try: print(f'  {d:18} {m.version(d)}')\n"
                    "    except m.PackageNotFoundError: print(f'  {d:18} -')", *SHOWN])
    import json

    wanted = {module: sorted(names) for module, names in third_party_imports(REPO / "src" / "vader").items()}
    if run([py, "-c", IMPORT_CHECK, json.dumps(wanted), json.dumps(sorted(OPTIONAL_IMPORTS))]) != 0:
        failures.append("imports")
    # ruff is a floor of the `test` extra: the oldest one must accept the code the newest one accepts.
    if run([str(args.venv / "bin" / "ruff"), "check", "--no-cache", "src", "tests", "tools"], cwd=REPO) != 0:
        failures.append("ruff")
    if not args.no_tests:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # -p no:cacheprovider: the run must not write into the checkout (it may be read-only in CI).
        cmd = [py, "-m", "pytest", "-x", "-p", "no:cacheprovider", *SMOKE_TESTS,
               *args.pytest_args]
        if run(cmd, cwd=REPO, env=env) != 0:
            failures.append("smoke tests")
    print("check_min_versions: " + ("FAILED: " + ", ".join(failures) if failures else "all floors pass"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
