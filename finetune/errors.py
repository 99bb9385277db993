"""The engine's exceptions, in one place.

Every error a caller can fix by changing its input derives from ``InputError`` (the CLI maps it to exit
code 2, the service to a 4xx); anything else is a failure of the run itself (exit code 1, a failed job).
"""

from __future__ import annotations


class FinetuneError(Exception):
    """Base class for every error the engine raises on purpose."""


class InputError(FinetuneError, ValueError):
    """Bad input from the caller: the message names the problem and how to fix it."""

    code = "bad_input"


class DatasetError(InputError):
    """The dataset (folder or zip) cannot be used: too few classes, an empty class, a corrupt zip..."""

    code = "bad_dataset"


class UnsafeArchiveError(DatasetError):
    """An archive entry would escape its folder, is a link, is encrypted, or the archive is a bomb."""

    code = "unsafe_archive"


class FolderNameClashError(DatasetError):
    """Two folders of a dataset would become one: their names differ only in what cleaning removes
    (Unicode normalisation, invisible characters, surrounding spaces, the length cap), or they name the
    same split. Never merged silently: the message names both."""

    code = "folder_name_clash"


class ImageError(InputError):
    """A file is not an image we accept (unreadable, truncated, unsupported format, too many pixels)."""

    code = "bad_image"


class ConfigError(InputError):
    """A training setting is out of range or unknown; ``problems`` lists every one."""

    code = "bad_config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class WeightsError(InputError):
    """Weights are missing from the cache, fail their hash check, or do not fit the architecture."""

    code = "bad_weights"


class WeightsNotCachedError(WeightsError):
    """ImageNet weights are not in the local cache (and nothing will be downloaded implicitly)."""

    code = "weights_missing"


class CheckpointError(InputError):
    """A run directory or checkpoint is missing, incomplete or inconsistent."""

    code = "bad_checkpoint"


class Cancelled(FinetuneError):
    """Training stopped because the caller's cancel flag was set; the last checkpoint is intact."""
