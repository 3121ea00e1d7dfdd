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
    except CarnetError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
