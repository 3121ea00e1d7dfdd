"""carnet's own errors, all of them, and how an entry point ends on one.

Every error that means "the input is not what carnet expects" (a data folder, a checkpoint, a config value, an
upload) is a :class:`CarnetError`; its message names the file, key or value and says what was expected. Entry
points print it as one line and exit non-zero (:func:`exit_on_error`), the service answers it with its HTTP status;
anything else is a bug and keeps its traceback. A run stopped by a signal is neither: :class:`RunInterrupted`
carries the line that says how to continue it.

Why one module for all of them, not each beside the code that raises it: a layer catches the errors of the layers
below it (predict and a phase turn a :class:`CheckpointError` into their own message) and should not import a
layer's heavy modules for a name (the ONNX service stays free of torch); and what can go wrong is listed in one
place, every kind a :class:`CarnetError` (tests/test_layers.py holds that). This module imports nothing of carnet,
so every layer may import it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class CarnetError(ValueError):
    """Bad input to carnet: the message alone tells the user what to fix. (A ValueError for older callers.)"""


# Data on disk (carnet.data).


class DataError(CarnetError):
    """The dataset on disk is not in the layout or state carnet expects; the message says what and where."""


class CacheError(CarnetError):
    """A cache setting is invalid; the message names the key and the expected values."""


# Run records (carnet.summary).


class SummaryError(CarnetError):
    """A summary.json that cannot be read: not JSON, not a summary, or written by a newer carnet."""


# Config values a user typed (carnet.config_check).


class ConfigError(CarnetError):
    """A config value a user typed is not one carnet can run with; the message names the key and what it expects."""


# Models, weights and checkpoints (carnet.models).


class CheckpointError(CarnetError):
    """A checkpoint cannot be read or is not a carnet checkpoint; the message names the file."""


class WeightsError(CarnetError):
    """A weights file does not fit the backbone; the message names the file and the keys."""


class PretrainedUnavailable(CarnetError):
    """Pretrained weights are neither cached nor downloadable; the message says how to run offline."""


# Training runs (carnet.training).


class PhaseError(CarnetError):
    """A run cannot start from a checkpoint (a phase's predecessor, ``resume=``): it is missing or does not fit; the
    message says what to do."""


class RefitError(CarnetError):
    """A refit cannot follow its selection run (missing, unfinished, or not a run), or ``refit=true`` was asked
    where it cannot apply (a single phase run)."""


class NonFiniteError(CarnetError):
    """Training diverged: a loss or a weight is NaN or infinite."""


class RunDirBusy(CarnetError):
    """Another live run owns this run directory."""


class RunDirNotWritable(CarnetError):
    """The run directory cannot be created or written (a read-only folder or file system)."""


# Prediction and export (carnet.inference).


class PredictError(CarnetError):
    """predict cannot go on as configured; the message names the file, key or value at fault."""


class ExportError(CarnetError):
    """An export or an exported file is not usable; the message names the file and what is wrong."""


class TTAError(CarnetError):
    """A TTA setting is invalid; the message names the key and what is expected."""


# Tools (carnet.tools, carnet.inspection).


class InspectError(CarnetError):
    """carnet-inspect cannot go on with what it was given; the message names the path or option at fault."""


# The web service (carnet.serving): each answered with its HTTP status, the message as the reason.


class BadUpload(CarnetError):
    """The request does not carry a usable upload; the message says why (answered as 400)."""


class BadImage(BadUpload):
    """The uploaded bytes are not a usable image; the message says why (answered as 400)."""


class ServerBusy(CarnetError):
    """This process cannot take the request now (answered as 503 with Retry-After); the message says why."""


class ModelLoadError(CarnetError):
    """The checkpoint / ONNX file cannot be served; the message names the file."""


try:  # the error gunicorn's worker reports in one line (and its master stops on, exit status 4)
    from gunicorn.errors import AppImportError
except ImportError:  # no gunicorn (another WSGI server, the development server): a plain CarnetError then
    AppImportError = CarnetError  # type: ignore[assignment,misc]


class ModelNotLoaded(ModelLoadError, AppImportError):
    """The model cannot be loaded when the app is created (a missing file, not a checkpoint, NaN weights, ...).

    Also gunicorn's ``AppImportError``: a gunicorn worker then prints this one line instead of two tracebacks,
    and the master stops with "App failed to load." and exit status 4 instead of restarting workers that cannot
    boot. A ModelLoadError for everyone else (``carnet-serve`` prints it as one line and exits 2).
    """


class ModelUnavailable(CarnetError):
    """The model cannot be loaded (answered 503); the message is safe to show: ours, or the error's type only."""


class RunInterrupted(SystemExit):
    """A run stopped by a signal: Ctrl-C (SIGINT) or a scheduler's preemption (SIGTERM: SLURM, Kubernetes).

    A SystemExit, like Lightning's own ``SIGTERMException``, so that no ``except Exception`` (Hydra's, a sweep's)
    takes it for a failed job, and with the exit status shells and schedulers give a process ended by that signal,
    128 + its number (130, 143): a script tells "interrupted, resume it" from "failed" (1). Where a scheduler's own
    handler ended the run, the status is the one it chose (``exit_status``, :func:`scheduler_exit_status`).
    """

    def __init__(self, message: str, signum: int, exit_status: int | None = None) -> None:
        super().__init__(128 + signum if exit_status is None else exit_status)
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
    if _ended_by_scheduler(err):
        return signal.Signals(_scheduler_signals[-1])
    return _signal_in_chain(err)


def _signal_in_chain(err: BaseException | None) -> signal.Signals | None:
    """The signal an exception in ``err``'s chain stands for: ours (RunInterrupted), Lightning's SIGTERM, Ctrl-C."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException  # Lightning only where runs train

    for cause in _chain(err):
        if isinstance(cause, RunInterrupted):
            return signal.Signals(cause.signum)
        if isinstance(cause, SIGTERMException):
            return signal.SIGTERM
        if isinstance(cause, KeyboardInterrupt):
            return signal.SIGINT
    return None


def _ended_by_scheduler(err: BaseException | None) -> bool:
    """A scheduler's handler ended the run: a plain SystemExit after a signal it noted (:func:`note_scheduler_signal`),
    none of the others in its chain."""
    return isinstance(err, SystemExit) and bool(_scheduler_signals) and _signal_in_chain(err) is None


def scheduler_exit_status(err: BaseException | None) -> int | None:
    """The exit status a scheduler's preemption handler ended the run with, or None. The scheduler reads it:
    submitit's local executor starts the requeued job only when the process exits 144, the status its handler asks
    for; on SLURM the handler requeues with ``scontrol`` and asks for -1."""
    code = getattr(err, "code", None)
    return code if _ended_by_scheduler(err) and isinstance(code, int) else None


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
