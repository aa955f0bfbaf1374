"""saelib's tests, laid out as the package is: ``core/``, ``data/``, ``lm/``, ``experiments/`` and
``figures/`` each test the modules of the sub-package of that name; the files at this level check
the repository as a whole (environment, README examples, references, the notebooks' claim rule);
``browser/`` drives the notebooks' widgets in Chromium (``make test-browser`` only).

Every folder is a package (an ``__init__.py``), so two test files may share a base name and the
builders shared between files are imported as ``from tests.builders import ...``.
"""
