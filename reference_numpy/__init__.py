"""NumPy reference implementation: the readable specification of the math.

Imports nothing but NumPy and the standard library. Every layer is a ``*_forward`` /
``*_backward`` pair with a hand-written backward; see ``docs/DESIGN.md``.
"""

from reference_numpy import checks, gradcheck, tolerances, tree

__all__ = ["checks", "gradcheck", "tolerances", "tree"]
__version__ = "0.1.0"
