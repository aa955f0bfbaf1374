"""Run a language-model notebook at full size and record its verdicts in its checking cell.

    python tools/record_verdicts.py notebooks/07_polysemanticity_checks.ipynb

Executes the notebook in place (as ``make figures`` does) in one kernel. Before the last code cell
(the ``# NBVAL_CHECK_OUTPUT`` cell, see notebooks/README.md) it reads the run's ``claims`` and
writes into that cell the lists the checking rule asks for: ``NOT_REPRODUCED`` (judged, converged,
not within the noise, does not hold), ``WITHIN_NOISE`` (judged, converged, within 2.83 standard
errors of flipping) and ``UNDECIDED`` (judged, last two checkpoints disagree); then runs the cell,
which asserts them, and saves the notebook. This is what a person recording a full run does by hand,
without a second full run. Later runs (``make figures``, ``make test``) assert the recorded lists.
The prose that explains the verdicts is still written by a person. Exits 1 if a cell fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

PROBE = """import json as _json
print(_json.dumps({
    "NOT_REPRODUCED": [c.text for c in claims if c.judged and c.converged and not c.within_noise and not c.holds],
    "WITHIN_NOISE": [c.text for c in claims if c.judged and c.converged and c.within_noise],
    "UNDECIDED": [c.text for c in claims if c.judged and not c.converged],
}))"""

# 06 at its floors evaluates ~32k held-out tokens in one cell: about 1.5 h on a 2-core CPU without bf16
CELL_TIMEOUT_S = 4 * 3600

COMMENTS = {"NOT_REPRODUCED": "the data contradict the source (see the prose)",
            "WITHIN_NOISE": "within 2.83 standard errors of flipping: not decided",
            "UNDECIDED": "the last two checkpoints disagree: undecided at this scale"}


def check_cell(lists: dict[str, list[str]]) -> str:
    lines = ["# NBVAL_CHECK_OUTPUT"]
    for name, texts in lists.items():
        if texts:
            lines.append(f"{name} = [  # {COMMENTS[name]}")
            lines += [f"    {json.dumps(t, ensure_ascii=False)}," for t in texts]
            lines.append("]")
        else:
            lines.append(f"{name} = []  # {COMMENTS[name]}")
    lines.append("print(cl.check_claims(claims, not_reproduced=NOT_REPRODUCED, within_noise=WITHIN_NOISE, "
                 "undecided=UNDECIDED))")
    return "\n".join(lines)


def main(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    last = code[-1]
    if not nb.cells[last].source.lstrip().startswith("# NBVAL_CHECK_OUTPUT"):
        raise SystemExit(f"{path}: the last code cell is not the # NBVAL_CHECK_OUTPUT cell")
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        with client.setup_kernel():
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                if i == last:
                    nb.cells.append(nbformat.v4.new_code_cell(PROBE))  # nbclient writes a cell back by index
                    probe = client.execute_cell(nb.cells[-1], len(nb.cells) - 1)
                    nb.cells.pop()
                    lists = json.loads("".join(o.get("text", "") for o in probe.outputs if o.get("name") == "stdout"))
                    cell.source = check_cell(lists)
                    print(json.dumps(lists, indent=1, ensure_ascii=False))
                client.execute_cell(cell, i)
    except CellExecutionError as err:
        print(err, file=sys.stderr)
        nbformat.write(nb, path.with_suffix(".failed.ipynb"))
        return 1
    tmp = path.with_suffix(".recording.ipynb")  # written whole, then renamed over the notebook
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
