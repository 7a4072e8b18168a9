"""The exceptions lungscreen raises on bad input.

Every error a user can cause derives from :class:`LungscreenError`, so the command line prints it as one
line instead of a traceback, and batch jobs can catch it per file and go on with the rest.
"""

from __future__ import annotations

from pathlib import Path


class LungscreenError(Exception):
    """Base of every error caused by bad input (files, manifests, configs), not by a bug."""


class ImageReadError(LungscreenError):
    """An image file that cannot be read; the message names the file and the reason.

    Attributes:
        path: the file that failed.
        reason: a short, specific reason ("truncated file", "not an image", ...).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(LungscreenError):
    """A manifest or a metadata table that breaks the schema (missing column, unknown label, ...)."""


class LeakageError(ManifestError):
    """A patient, or a near-duplicate image, sits in more than one split."""


class SourceError(LungscreenError):
    """A dataset folder whose layout does not match the adapter reading it."""


class ConfigError(LungscreenError):
    """A configuration value that is missing or out of range; the message names the key."""


class WeightsError(LungscreenError):
    """A weights or model file that cannot be used (unreadable, wrong layout, not downloadable)."""


class UnsafeWeightsError(WeightsError):
    """A weights file that holds pickled Python objects, which could run code when loaded."""


class OutOfScope(LungscreenError):
    """An image the model was not made for (another modality, noise, a photograph, a lateral view...): it is
    not screened. The message starts with "not screened:" and says which check refused it."""


class MetricError(LungscreenError, ValueError):
    """A figure asked of data that cannot give it: one class only for an AUC, NaN probabilities, a wrong shape.

    Also a ``ValueError``, so callers that caught the metrics' earlier ``ValueError`` keep working.
    """
