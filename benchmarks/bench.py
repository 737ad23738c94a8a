"""Benchmark entry script: ``python benchmarks/bench.py [flags]`` == ``bigmodel bench [flags]``.

The implementation lives in the installed package (``bigmodel_apps.bench``), so the suite also
runs where only the package is installed; this script only makes it runnable from a checkout
without installing (``PYTHONPATH=.`` or the script's own directory insertion below).

    python benchmarks/bench.py --plan smoke --out /tmp/bench
    python benchmarks/bench.py --plan cpu-targets --out benchmarks/results/cpu-$(date +%F)
    python benchmarks/bench.py --preset gpt2 --kinds decode --sides jax torch
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent  # the checkout, so `bigmodel_apps` imports from it
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bigmodel_apps.bench.cli import main

    sys.exit(main(sys.argv[1:]))
