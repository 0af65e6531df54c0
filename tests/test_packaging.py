"""pyproject.toml's dependencies and requirements.txt's pins say the same thing: the same
distributions, every pin inside its range, and every third-party module the package imports
declared (so `pip install .` gives a working `python -m distill_jax.main`)."""
import ast
import pathlib
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONAL = {"torch"}  # only to read a legacy PyTorch .pth when installed (convert/torch_pickle.py)


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r.name): r for r in map(Requirement, project["dependencies"])}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def test_the_ranges_hold_the_pins():
    declared, pins = _declared(), _pins()
    assert sorted(declared) == sorted(pins)
    for name, version in pins.items():
        assert declared[name].specifier.contains(version), (name, version, str(declared[name].specifier))


def test_every_imported_third_party_module_is_declared():
    modules = set()
    for package in ("distill_jax", "data_pipelines", "configs"):
        for file in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names
                   and m not in ("distill_jax", "data_pipelines", "configs") and m not in OPTIONAL}
    providers = packages_distributions()
    declared = set(_declared())
    undeclared = {m: providers.get(m) for m in third_party if not {_name(d) for d in providers.get(m, [])} & declared}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
