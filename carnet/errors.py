"""The one base class of carnet's own errors.

Every error that means "the input is not what carnet expects" (a data folder, a checkpoint, a config value)
derives from :class:`CarnetError`; its message names the file, key or value and says what was expected.
Entry points print it as one line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class CarnetError(ValueError):
    """Bad input to carnet: the message alone tells the user what to fix. (A ValueError for older callers.)"""


@contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Entry points: our errors become one line on stderr and exit status 1; anything else keeps its traceback."""
    try:
        yield
    except Exception as err:
        ours = _carnet_error(err)
        if ours is None:
            raise
        print(f"{prog}: error: {ours}", file=sys.stderr)
        sys.exit(1)


def _carnet_error(err: BaseException | None) -> CarnetError | None:
    """``err`` if it is ours, or ours that it wraps (Hydra's ``instantiate`` wraps errors raised in constructors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CarnetError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
