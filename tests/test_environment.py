"""environment.yml and pyproject.toml must describe the same environment."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_reqs() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["test"])
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda_reqs() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml must have exactly one pip: section"
    return {_name(r): r.replace(" ", "") for r in pip_lists[0]}


def test_same_packages_and_pins():
    assert _pyproject_reqs() == _conda_reqs()


def test_required_pins_present():
    reqs = _pyproject_reqs()
    assert reqs["torch"] == "torch==2.13.0"
    assert reqs["transformer-lens"] == "transformer-lens==3.9.0"


def test_conda_python_is_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
