"""The NumPy reference loads nothing but numpy and the standard library, at any depth.

``lint-imports`` (run by ``make test``) checks the package stack and forbids a list of packages
in ``reference_numpy``; this test checks the positive rule, which a forbidden-list cannot: import
every ``reference_numpy`` module in a fresh interpreter and look at what got loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import importlib, json, pkgutil, sys
import reference_numpy
for m in pkgutil.walk_packages(reference_numpy.__path__, "reference_numpy."):
    importlib.import_module(m.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_reference_numpy_imports_only_numpy_and_the_standard_library():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    allowed = set(sys.stdlib_module_names) | {"numpy", "reference_numpy", "__main__", "_distutils_hack"}
    # the editable install's path finder is pip's, loaded at start-up before any import of ours
    foreign = sorted(n for n in loaded if n not in allowed and not n.startswith("__editable__"))
    assert not foreign, f"importing reference_numpy loaded {foreign}"
    assert "reference_numpy" in loaded and "numpy" in loaded
