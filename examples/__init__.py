"""The programs README.md shows, runnable from the repository's root (tests/test_readme.py
runs them as README says): `asyncgrad worker NAME --import examples.MODULE` on the worker
side, `python -m examples.MODULE` or `asyncgrad run examples.MODULE:main` for the driver.
"""
