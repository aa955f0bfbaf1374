"""Refuse a Python interpreter outside pyproject.toml's requires-python.

Run by the interpreter to check, before `make` creates the virtual environment with it:
    python tools/check_python.py [--version X.Y.Z] [--pyproject PATH]
--version checks that version instead of the running interpreter's (for tests); --pyproject reads
another file. Exit 0 inside the range (one line on stdout), 1 outside it (the message on stderr),
2 if requires-python cannot be read or has a form this check does not know.
Plain standard library, no tomllib or packaging, and no f-strings, so that even an old interpreter
runs it far enough to say why it is refused.
"""
from __future__ import print_function

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)*)(\.\*)?\s*$")


def read_requires_python(path):
    """The requires-python string of the [project] table (a one-line TOML string)."""
    table = None
    with open(path) as f:
        for line in f:
            header = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
            if header:
                table = header.group(1).strip()
                continue
            key = re.match(r"""^\s*requires-python\s*=\s*(["'])(.*?)\1\s*(#.*)?$""", line)
            if key and table == "project":
                return key.group(2)
    return None


def parse_version(text):
    return tuple(int(part) for part in text.split("."))


def _pad(a, b):
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def satisfies(version, op, target, wildcard):
    """PEP 440 comparison for plain release numbers (X.Y.Z)."""
    if wildcard:
        if op not in ("==", "!="):
            raise ValueError("'.*' only goes with == or !=")
        same = (version + (0,) * len(target))[: len(target)] == target
        return same if op == "==" else not same
    v, t = _pad(version, target)
    if op == "~=":
        if len(target) < 2:
            raise ValueError("~= needs at least two release numbers")
        return v >= t and version[: len(target) - 1] == target[:-1]
    return {"==": v == t, "!=": v != t, "<=": v <= t, ">=": v >= t, "<": v < t, ">": v > t}[op]


def check(version, spec):
    """True when version (a tuple) satisfies every comma-separated clause of spec."""
    ok = True
    for clause in spec.split(","):
        m = CLAUSE.match(clause)
        if not m:
            raise ValueError("cannot read clause {0!r}".format(clause.strip()))
        ok = satisfies(version, m.group(1), parse_version(m.group(2)), bool(m.group(3))) and ok
    return ok


def suggestion(spec):
    """python3.11 for '>=3.11,<3.12' (the lowest major.minor named by >=, ~= or ==), else python3."""
    for clause in spec.split(","):
        m = CLAUSE.match(clause)
        if m and m.group(1) in (">=", "~=", "==") and "." in m.group(2):
            return "python" + ".".join(m.group(2).split(".")[:2])
    return "python3"


def main(argv):
    pyproject = os.path.join(ROOT, "pyproject.toml")
    version, given = sys.version_info[:3], False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--version", "--pyproject") and args:
            value = args.pop(0)
            if arg == "--pyproject":
                pyproject = value
            else:
                try:
                    version, given = parse_version(value), True
                except ValueError:
                    print("check_python: --version wants X.Y.Z, got {0!r}".format(value), file=sys.stderr)
                    return 2
        else:
            print(__doc__, file=sys.stderr)
            return 2
    spec = read_requires_python(pyproject)
    if not spec:
        print("check_python: no requires-python in the [project] table of {0}".format(pyproject), file=sys.stderr)
        return 2
    try:
        ok = check(version, spec)
    except ValueError as err:
        print("check_python: requires-python {0!r} in {1}: {2}".format(spec, pyproject, err), file=sys.stderr)
        return 2
    shown = ".".join(str(p) for p in version)
    who = "Python {0} (given with --version)".format(shown) if given else "{0} is Python {1}".format(sys.executable, shown)
    if not ok:
        print(
            "error: {0}, but saelib requires Python {1} (requires-python in {2}).\n"
            "Point PYTHON at an interpreter in that range, e.g. make PYTHON=/path/to/{3} test".format(
                who, spec, pyproject, suggestion(spec)
            ),
            file=sys.stderr,
        )
        return 1
    print("{0}: inside requires-python {1}".format(who, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
