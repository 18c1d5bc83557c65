"""User-facing errors.

Every problem a user can cause (a bad path, a corrupt file, an unsupported architecture, a memory
budget too small) is raised as an ``MERError`` subclass whose message names the thing at fault and
what to do about it. The CLI prints the message and exits non-zero without a traceback; library
callers can catch ``MERError``.
"""

from __future__ import annotations


class MERError(Exception):
    """Base class for errors that are the user's to fix, with a message meant for a person."""

    exit_code = 2


class ConfigError(MERError):
    """A model or engine configuration that is missing, malformed or unsupported."""


class CheckpointError(MERError):
    """A checkpoint folder whose files are missing, truncated or inconsistent."""


class StoreError(MERError):
    """An expert store that is missing, corrupt, truncated or of an unknown version."""


class TraceError(MERError):
    """A routing trace that cannot be read."""


class BudgetError(MERError):
    """A memory budget or pool that cannot hold what the run needs."""


class PoolTimeout(BudgetError):
    """Every BufferPool slot stayed busy for longer than the lease timeout."""


class DependencyError(MERError):
    """A feature needs a Python package that is not installed (names the package)."""


class ReadError(MERError):
    """A disk read that failed after its retries (names file and offset)."""

    exit_code = 1


class GGUFError(CheckpointError):
    """A GGUF file that is truncated, malformed, of an unknown version or type, or missing a
    part (names the file and the problem)."""
