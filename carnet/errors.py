"""The one base class of carnet's own errors.

Every error that means "the input is not what carnet expects" (a data folder, a checkpoint, a config value)
derives from :class:`CarnetError`; its message names the file, key or value and says what was expected.
Entry points print it as one line and exit non-zero; anything else is a bug and keeps its traceback.
A run stopped by a signal is neither: :class:`RunInterrupted` carries the line that says how to continue it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class CarnetError(ValueError):
    """Bad input to carnet: the message alone tells the user what to fix. (A ValueError for older callers.)"""


class RunInterrupted(SystemExit):
    """A run stopped by a signal: Ctrl-C (SIGINT) or a scheduler's preemption (SIGTERM: SLURM, Kubernetes).

    A SystemExit, like Lightning's own ``SIGTERMException``, so that no ``except Exception`` (Hydra's, a sweep's)
    takes it for a failed job, and with the exit status shells and schedulers give a process ended by that signal,
    128 + its number (130, 143): a script tells "interrupted, resume it" from "failed" (1).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(128 + signum)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


# Signals whose handler (a scheduler's: submitit requeues its job on SIGUSR2, then calls sys.exit) ended the run
# with a plain SystemExit: noted by carnet.training.train.signals_stop_the_run, read by stopping_signal.
_scheduler_signals: list[int] = []


def note_scheduler_signal(signum: int) -> None:
    """Remember that ``signum`` reached a scheduler's handler, which may then end the process with SystemExit."""
    _scheduler_signals.append(int(signum))


def stopping_signal(err: BaseException | None) -> signal.Signals | None:
    """The signal that stopped a run, read from the exception it ended with, or None for an error.

    Ctrl-C arrives as KeyboardInterrupt, which Lightning turns into ``SystemExit(1)`` raised while handling it;
    SIGTERM as Lightning's ``SIGTERMException`` (also raised by carnet outside ``fit``,
    :func:`carnet.training.train.signals_stop_the_run`); a scheduler's preemption signal (submitit's SIGUSR2) as
    the SystemExit its handler raises after requeueing the job (:func:`note_scheduler_signal`).
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException  # Lightning only where runs train

    for cause in _chain(err):
        if isinstance(cause, RunInterrupted):
            return signal.Signals(cause.signum)
        if isinstance(cause, SIGTERMException):
            return signal.SIGTERM
        if isinstance(cause, KeyboardInterrupt):
            return signal.SIGINT
    if isinstance(err, SystemExit) and _scheduler_signals:
        return signal.Signals(_scheduler_signals[-1])
    return None


@contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Entry points: our errors become one line on stderr and exit status 1; anything else keeps its traceback.
    An interrupted run prints its one line too, and exits with its own status (:class:`RunInterrupted`)."""
    try:
        yield
    except RunInterrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise
    except Exception as err:
        ours = _carnet_error(err)
        if ours is None:
            raise
        print(f"{prog}: error: {ours}", file=sys.stderr)
        sys.exit(1)


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


def _carnet_error(err: BaseException | None) -> CarnetError | None:
    """``err`` if it is ours, or ours that it wraps (Hydra's ``instantiate`` wraps errors raised in constructors)."""
    return next((cause for cause in _chain(err) if isinstance(cause, CarnetError)), None)
