"""How a command's failure reaches the shell: one line on stderr and an exit code.

=====  ======================================================================================
exit   when
=====  ======================================================================================
0      success
1      the run itself failed: JAX and the reference diverged, a loss became non-finite, a
       checkpoint could not be written (full disk...), or an *unexpected* error (a bug: its
       traceback is kept)
2      bad input, refused before or while it was used: options, configs, paths, data,
       corrupt / foreign / mismatched files, a run directory locked by another process, an
       optional extra that the asked-for feature needs and is not installed
130    interrupted by SIGINT (Ctrl-C); a training run checkpoints first
143    terminated by SIGTERM; a training run checkpoints first
=====  ======================================================================================

Expected errors print ``error: <message>`` with no traceback. The project raises ``ValueError``
(and subclasses: ``ConfigError``, ``DataError``, ``CheckpointError``...) for bad input at every
public boundary, and ``OSError`` for paths, so those two families are the "expected" ones.
``BIGMODEL_TRACEBACK=1`` re-raises everything, for debugging.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "run_command"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
# OSErrors of the machine rather than of the user's input: the run failed, the input was fine.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def _oserror_text(err: OSError) -> str:
    if err.strerror and err.filename is not None:
        return f"{err.strerror}: {err.filename}"
    return str(err)


def _one_line(err: BaseException) -> str:
    """The message on one line (lists of mismatches are joined with "; ")."""
    return "; ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def run_command(func: Callable[[Any], int], args: Any) -> int:
    """``func(args)`` with expected failures turned into one ``error: …`` line and an exit code."""
    if os.environ.get("BIGMODEL_TRACEBACK") == "1":
        return func(args)
    # imported here: these modules load the training stack, which `bigmodel --help` must not
    from bigmodel_train.extras import MissingExtraError
    from bigmodel_train.interrupt import Interrupted
    from bigmodel_train.runlock import RunLockedError
    from bigmodel_train.steps import NonFiniteError
    from bigmodel_train.trainer import RunCorruptError, SaveError, VerifyError

    try:
        return func(args)
    except Interrupted as err:
        print(f"interrupted: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (VerifyError, NonFiniteError, SaveError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    except (RunLockedError, RunCorruptError, MissingExtraError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"error: {_oserror_text(err)}", file=sys.stderr)
        return EXIT_FAILURE if err.errno in _ENVIRONMENT_ERRNOS else EXIT_USAGE
