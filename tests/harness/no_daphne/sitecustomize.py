"""Put on PYTHONPATH of a production process: importing daphne then fails.

The production lock has no daphne; this proves the production settings and
runtime never reach for it even where it happens to be installed (the dev venv).
"""
import importlib.abc
import sys


class _NoDaphne(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "daphne" or name.startswith("daphne."):
            raise ModuleNotFoundError("No module named 'daphne' (blocked: production must not need it)", name=name)
        return None


sys.meta_path.insert(0, _NoDaphne())
