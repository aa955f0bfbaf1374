"""The one checking rule of notebooks/README.md, enforced on every numbered notebook.

The only output nbval compares (``# NBVAL_CHECK_OUTPUT``) is ``claims.verdicts``: no measured digit,
so the test command passes on CPUs and GPUs that round differently.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_checking_cells_follow_the_rule(path):
    cells = _code_cells(path)
    checked = [c for c in cells if c.lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    assert len(checked) == 1, f"{path.name}: exactly one CHECK_OUTPUT cell, found {len(checked)}"
    table, check = cells[-2], cells[-1]
    assert check is checked[0], f"{path.name}: the CHECK_OUTPUT cell must be the last code cell"
    assert table.lstrip().startswith("# NBVAL_IGNORE_OUTPUT") and "claims_table(claims)" in table, path.name
    body = [line for line in check.splitlines()[1:] if line.strip()]
    # the compared cell only asserts the claims and prints their verdicts: nothing else can print a digit
    prints = [line for line in body if "print(" in line]
    allowed = ["print(cl.check_claims(claims, not_reproduced=NOT_REPRODUCED, within_noise=WITHIN_NOISE))",
               # real-model notebooks: claims undecided at this scale (their convergence curves disagree)
               "print(cl.check_claims(claims, not_reproduced=NOT_REPRODUCED, within_noise=WITHIN_NOISE, undecided=UNDECIDED))"]
    assert len(prints) == 1 and prints[0] in allowed, f"{path.name}: prints {prints}"
    assert not any("display(" in line or "f\"" in line and "print" in line for line in body), path.name


def _interact_calls(source: str):
    """(lambda argument names, keyword names) of every ``widgets.interact*(lambda ...: ..., kw=...)``."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("interact") and node.args and isinstance(node.args[0], ast.Lambda)):
            yield [a.arg for a in node.args[0].args.args], [k.arg for k in node.keywords]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_widget_lambdas_take_exactly_their_widgets(path):
    # make figures does not execute widget cells (skip-execution); a lambda that misses one of its
    # widgets only fails when the widget is moved, so check the names statically
    for cell in _code_cells(path):
        if "interact" not in cell:
            continue
        for args, kws in _interact_calls(cell.replace("%matplotlib inline", "")):
            assert sorted(args) == sorted(kws), f"{path.name}: lambda takes {args}, widgets {kws}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_parameters_cell(path):
    """Every notebook's knobs sit in one code cell tagged ``parameters`` (papermill's convention), the
    first code cell: make test-browser, and anyone running a notebook at other sizes, override it there."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], f"{path.name}: code cells tagged 'parameters': {tagged} (expected only the first)"
