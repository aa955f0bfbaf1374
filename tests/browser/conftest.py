"""The browser test runs only when asked for (``make test-browser`` sets ``SAELIB_BROWSER_TEST=1``).

Without the variable nothing in this folder is collected, so ``pytest tests`` and ``make test`` neither
import Playwright nor start JupyterLab, and report no skipped test for it.
"""

import os

collect_ignore_glob = [] if os.environ.get("SAELIB_BROWSER_TEST") == "1" else ["test_*.py"]
