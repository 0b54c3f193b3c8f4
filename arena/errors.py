"""One error base for the whole package: every failure arena can explain derives from ``ArenaError``.

Each stage raises its own subclass (so callers and tests can be specific) and the CLI catches ``ArenaError``
once, printing the message, which always names the file or option at fault and what to do.
The subclasses keep the built-in base they had before (``ValueError`` or ``RuntimeError``), so code that caught
those still works.
"""

from __future__ import annotations

import os


class ArenaError(Exception):
    """An error whose message is meant for the user: what was given, what is allowed, what to try."""


class DataError(ArenaError, ValueError):
    """The data folder, a CSV or the split file cannot be used; the message names the file and the problem."""


class VideoDecodeError(ArenaError, RuntimeError):
    """A file from which no frame can be decoded. ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


class CacheError(ArenaError, RuntimeError):
    """The feature cache cannot be used; the message names the file and the rebuild command."""


class WeightsUnavailable(ArenaError, RuntimeError):
    """Backbone weights cannot be loaded; the message names the three ways to provide them."""


class ModelsError(ArenaError, ValueError):
    """A file of the models folder (checkpoint, frame test, study output) is missing, unsafe or from elsewhere."""


class PredictError(ArenaError, RuntimeError):
    """The model cannot be loaded or the inputs cannot be predicted; the message says what to do."""


class SubmissionError(ArenaError, RuntimeError):
    """The submission cannot be written or fails validation; the previous CSV is left untouched."""


class TrainError(ArenaError, RuntimeError):
    """Fine-tuning cannot start or continue (settings differ from the run to resume, nothing to train on, ...)."""


class StudyError(ArenaError, RuntimeError):
    """The Optuna study cannot be opened or continued (other search space, storage unreachable, ...)."""


class OutOfMemoryAfterFallback(ArenaError, RuntimeError):
    """Every step of the out-of-memory fallback chain ran out of memory too."""


class OptionError(ArenaError, ValueError):
    """An option's value is outside what is allowed (the message gives the allowed values or range)."""


class FaceDetectorUnavailable(ArenaError, RuntimeError):
    """The package behind a face detector is not installed (or does not import); the message gives the pip command."""


class ThermalTimeout(ArenaError, RuntimeError):
    """A thermal pause lasted its maximum wait (``--thermal-max-wait``) without the GPU cooling enough to resume.

    Training stops the way an interrupted run does: ``last.pt`` keeps the last finished epoch and the same command
    continues from it. ``exit_status`` is what ``arena train-full`` exits with: 75, sysexits' EX_TEMPFAIL ("try
    again later"), so a script can tell "rerun when the machine has cooled" from "fix the input" (1, 2).
    """

    exit_status = 75
