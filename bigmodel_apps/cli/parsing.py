"""argparse pieces shared by the command groups."""

from __future__ import annotations

import argparse
from typing import Any


class IntermixedParser(argparse.ArgumentParser):
    """A sub-parser that takes its positionals anywhere among the options
    (``bigmodel tune demo --random 8 lr=log:1e-4:1e-2``); plain argparse stops filling an
    ``nargs="*"`` positional at the first option."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False

