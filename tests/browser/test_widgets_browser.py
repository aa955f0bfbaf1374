"""Widget cells in a real browser: JupyterLab from the venv, driven by headless Chromium (Playwright).

For every notebook in ``notebooks/`` that calls ``interact`` / ``interact_manual`` / ``interactive``
(found by reading the notebooks, so a notebook that gains a widget is included), a temporary copy is
opened in JupyterLab, all its cells are run, each interact widget gets one control changed (and its
"Run Interact" button pressed for ``interact_manual``), and the test asserts that

* the widget's output area changes (its HTML after the change differs from before, and is not empty);
* no cell and no widget output shows an error (an output of type ``error``, or a traceback in a widget's
  output area; text on stderr such as warnings is not an error).

One screenshot per notebook is saved under a temporary folder (its path is printed).

The notebooks run at reduced size so the whole test fits in a few minutes on two CPU cores: the copy
gets one cell, right after its ``parameters`` cell, that assigns :data:`QUICK_OVERRIDES` (and checks the
kernel runs the venv's interpreter), and the kernel gets ``SAELIB_QUICK=1`` (read by the language-model
notebooks). The last checking cell (``check_claims``) is dropped from the copy: at these sizes the
recorded verdicts are not expected to hold (``make test`` checks them at full size). Nothing in the
repository is written: notebooks, JupyterLab's config, settings and workspaces, and the figures all live
in a temporary folder; the language-model notebooks load SmolLM2 offline and read their activations and
SAEs from (or write them into) ``$SAELIB_CACHE_DIR``.

Run: ``make test-browser`` (or ``SAELIB_BROWSER_TEST=1 .venv/bin/python -m pytest tests/browser -s``
with the venv's bin first on PATH). ``tests/browser/conftest.py`` keeps this file out of ``pytest
tests``. Needs Chromium at ``/usr/bin/chromium`` (``$SAELIB_CHROMIUM`` overrides) and Playwright.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.builders import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
VENV = Path(sys.prefix)  # the interpreter running this test: make test-browser uses .venv's
CHROMIUM = os.environ.get("SAELIB_CHROMIUM", "/usr/bin/chromium")

# a cell that calls one of these builds a widget-interact box with an output area the test can drive
WIDGET_CALL = re.compile(r"\b(?:interact|interact_manual|interactive)\s*\(")

# Quick sizes per notebook (by its two-digit number), assigned in a cell right after the parameters
# cell. Every name must be a parameter of the notebook (the test fails otherwise, so a renamed knob is
# noticed). Constraints the notebooks put on them are kept: SHOW < N_SEEDS, D_VOCAB in WIDTHS,
# SHOW_PENALTY / SHOW_COEFF in the swept lists, and N_SEEDS >= 2 where a widget slides over seeds.
QUICK_OVERRIDES: dict[str, dict[str, object]] = {
    "01": {"N_SEEDS": 2, "STEPS": 300, "RETRAIN_STEPS": 300},  # RETRAIN_STEPS: the interact_manual cell's own SAEs
    "02": {"Q_VALUES": [0.1, 0.5], "L1_VALUES": [1e-3, 0.1], "STEPS": 300, "MATRYOSHKA_STEPS": 300, "N_SEEDS": 2},
    "03": {"N_SEEDS": 2, "STEPS": 300, "HYP_STEPS": 100, "PROBE": 2_000, "ABS_SEEDS": 2, "ABS_STEPS": 100},
    "04": {"STEPS": 200, "N_SEEDS": 2, "TOPK_STEPS": 100, "COEFFS": (0.1, 0.3)},  # the claims cell reads 0.1 and 0.3
    "05": {"N_TEST": 2_000, "N_SAE_TRAIN": 5_000, "N_SAE_EVAL": 2_000, "WIDTHS": [8, 16, 64], "N_SEEDS": 2,
           "MODEL_STEPS": 300, "L1_SWEEP": [0.3], "SAE_STEPS": 150},
    # language-model notebooks: on top of SAELIB_QUICK=1 (which the parameters cell reads)
    "06": {"LAYERS": (2, 23), "S_VALUES": (0, 4), "D_SAE": 256, "STEPS": 50, "BATCH": 128, "N_TRAIN_DOCS": 15,
           "N_HELDOUT_DOCS": 3},
    "07": {"PASSES": 8, "D_SAE": 576, "N_TRAIN_DOCS": 40, "N_EVAL_DOCS": 30},
    "08": {"PASSES": 8, "WIDTHS": (144, 288, 576), "N_TRAIN_DOCS": 40, "N_EVAL_DOCS": 30, "N_MCS_DOCS": 30},
}

# Notebooks that fail in the browser for a reason inside the notebook (not this test): number -> reason.
# Each is skipped with its reason printed; remove the entry once the notebook is fixed.
KNOWN_BROKEN: dict[str, str] = {}

# the self-test breaks the first widget of this notebook (a small one whose first widget is interact)
FAULT_NOTEBOOK = "02"
FAULT_MESSAGE = "fault injected by the browser self-test"

RUN_TIMEOUT_S = 300  # running all cells of one notebook
WIDGET_TIMEOUT_S = 120  # one widget's output to change after its control is changed


class WidgetCheckError(AssertionError):
    """A notebook failed in the browser: an error output, a widget whose output did not change, ..."""


# --- the notebooks -----------------------------------------------------------------------------------


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def widget_calls(nb: dict) -> int:
    """Number of interact / interact_manual / interactive calls in the notebook's code cells."""
    return sum(len(WIDGET_CALL.findall(_source(c))) for c in nb["cells"] if c["cell_type"] == "code")


def widget_notebooks() -> list[Path]:
    return [p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")) if widget_calls(json.loads(p.read_text()))]


def _assigned_names(source: str) -> set[str]:
    names = set()
    for line in source.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z_0-9]*(?:\s*,\s*[A-Za-z_][A-Za-z_0-9]*)*)\s*=(?!=)", line)
        if m:
            names |= {n.strip() for n in m.group(1).split(",")}
    return names


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}


def quick_copy(src: Path, dest_dir: Path, inject_fault: bool = False) -> tuple[Path, int]:
    """Write the quick copy of notebook ``src`` into ``dest_dir``; return its path and widget count.

    Inserts the overrides cell after the parameters cell, drops the ``check_claims`` cell and, with
    ``inject_fault``, makes the first widget's callback raise from its second call on (its first call
    draws the initial view; the test's change of a control is the second).
    """
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:  # stored outputs would count as "before" and hide a widget that never drew
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    cells = nb["cells"]
    params = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and "parameters" in _tags(c)]
    assert params, f"{src.name}: no code cell tagged 'parameters'"
    overrides = QUICK_OVERRIDES.get(src.name[:2], {})
    unknown = set(overrides) - _assigned_names(_source(cells[params[0]]))
    assert not unknown, f"{src.name}: QUICK_OVERRIDES names {sorted(unknown)}, not parameters of the notebook"
    lines = ["# browser test (tests/browser/test_widgets_browser.py): quick sizes, and the venv's kernel",
             "import sys as _sys",
             f"assert _sys.prefix == {str(VENV)!r}, f'kernel runs {{_sys.executable}}, not the venv ({VENV})'"]
    lines += [f"{name} = {value!r}" for name, value in overrides.items()]
    if inject_fault:
        lines += ["_browser_test_calls = [0]",
                  "def _browser_test_fault():",
                  "    _browser_test_calls[0] += 1",
                  "    if _browser_test_calls[0] > 1:",
                  f"        raise RuntimeError({FAULT_MESSAGE!r})"]
    cells.insert(params[0] + 1, _code_cell("\n".join(lines)))
    nb["cells"] = cells = [c for c in cells if not (c["cell_type"] == "code" and "check_claims(" in _source(c))]
    if inject_fault:
        (first,) = [c for c in cells if c["cell_type"] == "code" and WIDGET_CALL.search(_source(c))][:1]
        source, n = re.subn(r"\blambda ([^:]*):", r"lambda \1: _browser_test_fault() or ", _source(first), count=1)
        assert n == 1, f"{src.name}: the first widget cell has no lambda to break"
        first["source"] = source
    dest = dest_dir / src.name
    dest.write_text(json.dumps(nb, indent=1))
    return dest, widget_calls(nb)


# --- JupyterLab and the browser ------------------------------------------------------------------------


@dataclass
class Lab:
    """A JupyterLab server on a temporary root folder, and a headless Chromium page on it."""

    url: str
    root: Path
    shots: Path
    page: Page
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


def _kernel_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # the python3 kernel is the venv's
        JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), IPYTHONDIR=str(tmp / "ipython"),
        SAELIB_QUICK="1", SAELIB_FIGURES_DIR=str(tmp / "figures"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    env.pop("SAELIB_BROWSER_TEST", None)
    return env


@pytest.fixture(scope="module")
def lab():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set SAELIB_CHROMIUM)")
    tmp = Path(tempfile.mkdtemp(prefix="saelib-browser-"))
    root, shots = tmp / "notebooks", tmp / "screenshots"
    root.mkdir()
    shots.mkdir()
    # every cell in the DOM (no virtual scrolling), so widgets below the fold can be found and driven
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension"  # no "get Jupyter news?" toast on screenshots
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port = free_port()
    log = open(tmp / "jupyterlab.log", "w")
    env = _kernel_env(tmp)
    server = subprocess.Popen(
        [str(VENV / "bin" / "jupyter"), "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
         f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    print(f"\nJupyterLab {url} (log {tmp / 'jupyterlab.log'}); screenshots in {shots}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            lab = Lab(url, root, shots, page, env)
            yield lab
            browser.close()
        total = sum(lab.timings.values())
        print("\nbrowser test wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in lab.timings.items())
              + f"; total {total:.0f} s; screenshots in {shots}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# JavaScript run in the page (JupyterLab exposes its application as window.jupyterapp)
# the notebook's panel, found by its path (not "the current widget": a restored or closing tab may be),
# is kept as window.browserTestPanel for the snippets below
_JS_READY = """(path) => {
  const app = window.jupyterapp;
  const w = app && Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === path);
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  window.browserTestPanel = w;
  return !!(k && k.status === 'idle' && w.content && w.content.widgets.length);
}"""
_JS_KERNEL_STATUS = """() => {
  const w = window.browserTestPanel;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : 'none';
}"""
_JS_RUN_DONE = """() => {
  const w = window.browserTestPanel;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  if (!k) return 'kernel gone';
  if (k.status === 'dead') return 'kernel died';
  if (k.status !== 'idle') return false;
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  if (code.some(c => (c.promptNode && c.promptNode.textContent || '').includes('*'))) return false;
  const errored = code.some(c => [...Array(c.model.outputs.length).keys()]
                                  .some(j => c.model.outputs.get(j).type === 'error'));
  return errored || code.every(c => c.model.executionCount !== null) ? 'done' : false;
}"""
_JS_ERRORS = """() => {
  const w = window.browserTestPanel;
  const found = [];
  w.content.widgets.forEach((c, i) => {
    if (c.model.type !== 'code') return;
    for (let j = 0; j < c.model.outputs.length; j++) {
      const o = c.model.outputs.get(j).toJSON();
      if (o.output_type === 'error')
        found.push(`cell ${i} (${c.model.sharedModel.getSource().split('\\n')[0]}): ${o.ename}: ${o.evalue}`);
    }
  });
  w.node.querySelectorAll('.widget-output').forEach((el, i) => {
    const text = el.textContent || '';
    if (text.includes('Traceback (most recent call last)'))
      found.push(`widget output ${i}: ` + text.trim().split('\\n').filter(l => l.trim()).slice(-1)[0]);
  });
  return found;
}"""


def _wait(page: Page, js: str, what: str, timeout_s: float, arg=None):
    try:
        return page.wait_for_function(js, arg=arg, polling=500, timeout=timeout_s * 1000).json_value()
    except Exception as e:  # playwright's TimeoutError, or the page went away
        raise WidgetCheckError(f"{what}: not within {timeout_s:.0f} s ({type(e).__name__})") from None


def _errors(page: Page, name: str) -> None:
    found = page.evaluate(_JS_ERRORS)
    if found:
        raise WidgetCheckError(f"{name}: error output(s) in the browser:\n  " + "\n  ".join(found))


CONTROLS = (".widget-dropdown select, .widget-slider .noUi-handle, .widget-text input, .widget-checkbox input, "
            ".widget-toggle-buttons button")


def _change(control) -> str:
    """Change one control of an interact box once, as a user would; return what was done."""
    kind = control.evaluate("el => el.tagName.toLowerCase() + ':' + (el.className || '') + ':' + (el.type || '')")
    if kind.startswith("select"):
        values = control.evaluate("s => [...s.options].map(o => o.value)")
        current = control.input_value()
        new = next((v for v in values if v != current), None)
        assert new is not None, "dropdown with a single option"
        control.select_option(new)
        return f"dropdown {current!r} -> {new!r}"
    if "noUi-handle" in kind:
        now, top = (float(control.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemax"))
        key = "ArrowRight" if now < top else "ArrowLeft"
        control.focus()
        control.press(key)
        return f"slider at {now:g} {key}"
    if kind.endswith(":number") or kind.endswith(":text"):
        value = control.input_value()
        top = control.get_attribute("max")
        new = int(float(value)) + 1 if top is None or float(value) < float(top) else int(float(value)) - 1
        control.fill(str(new))
        control.press("Enter")
        return f"text {value} -> {new}"
    control.click()
    return f"clicked {kind}"


# Before a change, the output area's children are marked; the area has redrawn once none of them is left
# (JupyterLab replaces an output area's children when the callback's clear_output + display arrive, even
# with the same figure), it holds a figure, HTML or text (or a traceback), and the interact_manual button,
# disabled while the callback runs, is enabled again.
_JS_MARK = "el => el.querySelectorAll('.jp-OutputArea-child').forEach(c => c.dataset.browserTestOld = '1')"
_JS_REDRAWN = """([el, button]) => !el.querySelector('[data-browser-test-old]') && (!button || !button.disabled)
  && !!el.querySelector('img, svg, .jp-RenderedHTMLCommon, .jp-RenderedText')"""


def _redrawn(page: Page, out, timeout_s: float, button=None) -> bool:
    try:
        page.wait_for_function(_JS_REDRAWN, arg=[out.element_handle(), button and button.element_handle()],
                               polling=250, timeout=timeout_s * 1000)
        return True
    except Exception:  # playwright's TimeoutError
        return False


def _drive(page: Page, name: str, i: int, box) -> str:
    """Change every control of interact box ``i`` once (then press Run Interact if it has one).

    Every change of an interact box, and the button of an interact_manual box, must redraw the output
    area without an error; the first change (or the button) must also change what it shows (a later
    change may leave the view as it was, e.g. a depth slider beyond the deepest level). Returns what was done.
    """
    box.scroll_into_view_if_needed()
    out = box.locator(".widget-output").first
    manual = box.get_by_role("button", name="Run Interact")
    manual = manual if manual.count() else None
    start = out.inner_html()
    done = []

    def redraw(action: str, before: str, must_differ: bool) -> str:
        if not _redrawn(page, out, WIDGET_TIMEOUT_S, manual):
            _errors(page, name)
            raise WidgetCheckError(f"{name}: widget {i}: {action}: its output area did not redraw within "
                                   f"{WIDGET_TIMEOUT_S} s")
        _wait(page, f"() => ({_JS_KERNEL_STATUS})() === 'idle'", f"{name}: kernel idle after widget {i}",
              WIDGET_TIMEOUT_S)
        _errors(page, name)
        if out.inner_html() != before:
            return action
        if must_differ:
            raise WidgetCheckError(f"{name}: widget {i}: {action}: its output area redrew the same view")
        return action + " (same view)"

    for k in range(box.locator(CONTROLS).count()):
        before = out.inner_html()
        out.evaluate(_JS_MARK)
        action = _change(box.locator(CONTROLS).nth(k))
        done.append(action if manual else redraw(action, before, must_differ=k == 0))
    if manual is not None:
        out.evaluate(_JS_MARK)
        manual.click()
        done.append(redraw("Run Interact", start, must_differ=True))
    return ", ".join(done)


def check_notebook(lab: Lab, src: Path, inject_fault: bool = False) -> str:
    """Open the quick copy of ``src`` in JupyterLab, run all, drive every widget; return the screenshot path.

    Raises WidgetCheckError on an error output, a widget that does not redraw, or a timeout.
    """
    page, name = lab.page, src.name
    nb_path, n_widgets = quick_copy(src, lab.root, inject_fault)
    page.goto(f"{lab.url}/lab/tree/{nb_path.name}?reset")  # ?reset: no tabs restored from the last notebook
    _wait(page, _JS_READY, f"{name}: notebook open with an idle kernel", 120, arg=nb_path.name)
    page.evaluate("""() => { const app = window.jupyterapp;  // not awaited: the promise ends with the run
      app.shell.activateById(window.browserTestPanel.id); app.commands.execute('notebook:run-all-cells'); }""")
    state = _wait(page, _JS_RUN_DONE, f"{name}: running all cells", RUN_TIMEOUT_S)
    if state != "done":
        raise WidgetCheckError(f"{name}: {state} while running all cells")
    _errors(page, name)
    boxes = page.locator(".jp-Notebook .widget-interact")
    assert boxes.count() == n_widgets, f"{name}: {boxes.count()} interact widgets shown, {n_widgets} in the code"
    for i in range(n_widgets):
        print(f"  {name}: widget {i}: {_drive(page, name, i, boxes.nth(i))}: output redrawn")
    boxes.nth(n_widgets - 1).locator(".widget-output").first.scroll_into_view_if_needed()
    shot = lab.shots / f"{nb_path.stem}{'-fault' if inject_fault else ''}.png"
    page.screenshot(path=str(shot))
    return str(shot)


def _shutdown_kernels(lab: Lab) -> None:
    lab.page.evaluate("""() => Promise.race([window.jupyterapp.serviceManager.sessions.shutdownAll(),
                                              new Promise(done => setTimeout(done, 30000))])""")


@pytest.mark.parametrize("src", widget_notebooks(), ids=lambda p: p.stem)
def test_widgets_in_browser(lab, src):
    if src.name[:2] in KNOWN_BROKEN:
        print(f"\nSKIP {src.name}: {KNOWN_BROKEN[src.name[:2]]}")
        pytest.skip(f"{src.name}: {KNOWN_BROKEN[src.name[:2]]}")
    print(f"\n{src.name}: overrides {QUICK_OVERRIDES.get(src.name[:2], 'none')}")
    t0 = time.perf_counter()
    try:
        shot = check_notebook(lab, src)
    finally:
        lab.timings[src.name[:2]] = time.perf_counter() - t0
        _shutdown_kernels(lab)
    print(f"  {src.name}: {lab.timings[src.name[:2]]:.0f} s, screenshot {shot}")


def test_browser_test_catches_a_raising_widget(lab):
    """The harness fails a notebook whose widget callback raises (fault injected into a temporary copy)."""
    (src,) = [p for p in widget_notebooks() if p.name.startswith(FAULT_NOTEBOOK)] or [None]
    if src is None:
        pytest.skip(f"notebook {FAULT_NOTEBOOK} has no widget to break")
    t0 = time.perf_counter()
    try:
        with pytest.raises(WidgetCheckError, match=FAULT_MESSAGE) as caught:
            check_notebook(lab, src, inject_fault=True)
    finally:
        lab.timings[f"self-test ({FAULT_NOTEBOOK})"] = time.perf_counter() - t0
        _shutdown_kernels(lab)
    print(f"\nself-test: the harness reported\n  {caught.value}")
