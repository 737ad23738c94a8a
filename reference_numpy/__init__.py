"""NumPy reference implementation: the readable specification of the math.

Imports nothing but NumPy and the standard library. Every layer is a ``*_forward`` /
``*_backward`` pair with a hand-written backward; see ``docs/DESIGN.md``.
"""

from reference_numpy import checks, configs, gradcheck, optim, schedules, tolerances, tree
from reference_numpy.version import __version__

__all__ = ["__version__", "checks", "configs", "gradcheck", "optim", "schedules", "tolerances", "tree"]
