"""The base class of the errors that refuse a run for a reason its user can fix.

A refusal (an invalid config, a resume with a changed config, a locked output_dir, a damaged
checkpoint, too many skipped records, ...) is a message, not a bug: the CLI prints it once on
rank 0, one line on every other rank, and exits with the class's `exit_code`, without a
traceback. Each such error also keeps its usual built-in base (ValueError, RuntimeError, ...),
so code that catches those still does.
"""

from __future__ import annotations


class RefusedError(Exception):
    """A run refused or stopped for a reason stated in the message (no traceback needed)."""

    exit_code = 1
    """The process exit code the CLI returns for it."""
