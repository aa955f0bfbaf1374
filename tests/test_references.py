"""Sources a reader of the repository can follow.

Every tracked text file cites public sources by author and year from REFERENCES.md, never by a
working name that only the project's authors had: a "seed thread" or "seed 00N", a path outside the
repository (``../shared/...``, ``EXPERIMENTS.md``) or an issue number. And every ``[Key Year]`` that a
notebook or README cites is an entry of REFERENCES.md.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# (what it is, pattern): each is a citation a reader cannot follow
FORBIDDEN = [
    ("a seed thread", re.compile(r"\bseed[ -]threads?\b", re.IGNORECASE)),
    ("a numbered seed (seed 000, seed-003, seeds 001)", re.compile(r"\bseeds?[ -](?:threads? )?0\d\d\b", re.IGNORECASE)),
    ("a path outside the repository", re.compile(r"\.\./shared\b|\bshared/EXPERIMENTS")),
    ("the project's private experiment list", re.compile(r"\bEXPERIMENTS\.md\b")),
    ("an issue number", re.compile(r"\bissues?[ -]#?\d+", re.IGNORECASE)),
]

# a citation key: [Nabeshima 2024], [Bussmann et al. 2024b], [Bradley & Mangasarian 1998]
CITED_KEY = re.compile(r"\[([A-Z][^\[\]\n]*? \d{4}[a-z]?)\]")
# an entry of REFERENCES.md: a line starting with **[Key]**
ENTRY_KEY = re.compile(r"^\*\*\[([^\[\]]+)\]\*\*", re.MULTILINE)


def forbidden_citations(text: str) -> list[tuple[str, str]]:
    """``(what, matched text)`` for every citation in ``text`` that a reader cannot follow."""
    return [(what, m.group(0)) for what, pat in FORBIDDEN for m in pat.finditer(text)]


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.decode().split("\0") if p]


def _texts() -> list[Path]:
    files = _tracked("*.py", "*.md", "*.ipynb", "Makefile", ".ci/run")
    return [p for p in files if p.relative_to(ROOT).as_posix() != THIS and p.is_file()]


@pytest.mark.parametrize("text, what", [
    ("**Claim (Noa Nabeshima, seed thread 004)**", "a seed thread"),
    ("Nabeshima (seed 000): trees", "a numbered seed (seed 000, seed-003, seeds 001)"),
    ("the seed-003-penalty SAE", "a numbered seed (seed 000, seed-003, seeds 001)"),
    ("| seeds 001, 003 |", "a numbered seed (seed 000, seed-003, seeds 001)"),
    ("(`../shared/EXPERIMENTS.md` part F)", "a path outside the repository"),
    ("in the form of EXPERIMENTS.md part F", "the project's private experiment list"),
    ("after issue 12's settings", "an issue number"),
    ("see .notes/issue-3.md", "an issue number"),
])
def test_the_patterns_catch_each_kind_of_citation(text, what):
    assert what in [w for w, _ in forbidden_citations(text)]


@pytest.mark.parametrize("text", [
    "tree = nabeshima_tree(seed=SEED)",              # RNG seeds stay
    "L1 seed 2 vs L1: 20.9 %",
    "g = torch.Generator().manual_seed(seed + 1)",
    "unlike ``seed + i``, where seed 0's instance 1 would be seed 1's instance 0",
    "from saelib.experiments import claims",         # the package's own module names
    "Nabeshima's comment on [Bussmann et al. 2024b]",
    "jupyter/nbclient#312",
])
def test_the_patterns_spare_rng_seeds_and_real_citations(text):
    assert forbidden_citations(text) == []


def test_no_tracked_file_cites_what_a_reader_does_not_have():
    files = _texts()
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "README.md" for p in files)
    found = [f"{p.relative_to(ROOT)}: {what}: {hit!r}" for p in files
             for what, hit in forbidden_citations(p.read_text(encoding="utf-8", errors="replace"))]
    assert not found, "cite by author and year from REFERENCES.md instead:\n" + "\n".join(found)


def test_every_cited_key_is_in_references():
    entries = ENTRY_KEY.findall((ROOT / "REFERENCES.md").read_text(encoding="utf-8"))
    assert len(entries) == len(set(entries)), "a key appears twice in REFERENCES.md"
    citing = [p for p in _tracked("notebooks/*.ipynb", "README.md", "notebooks/README.md")]
    assert any(p.suffix == ".ipynb" for p in citing)
    cited = {(p.relative_to(ROOT).as_posix(), key) for p in citing
             for key in CITED_KEY.findall(p.read_text(encoding="utf-8"))}
    assert {key for _, key in cited}, "no [Key Year] citation found: the key pattern is broken"
    missing = sorted(f"{path}: [{key}]" for path, key in cited if key not in entries)
    assert not missing, "cited but not in REFERENCES.md:\n" + "\n".join(missing)


def test_the_key_pattern_reads_keys_and_not_other_brackets():
    text = ("[Nabeshima 2024]; [Bussmann et al. 2024b]; [Bradley & Mangasarian 1998]; "
            "[REFERENCES.md](../REFERENCES.md); [1, 3]; [batch, inst, d_sae]; [NOT reproduced]")
    assert CITED_KEY.findall(text) == ["Nabeshima 2024", "Bussmann et al. 2024b", "Bradley & Mangasarian 1998"]
    assert ENTRY_KEY.findall("**[Nabeshima 2024]** Noa Nabeshima.\ntext **[not an entry]**") == ["Nabeshima 2024"]
