"""Errors that carry a message meant for the user (shown as one line by the CLI and widgets)."""

from __future__ import annotations


class MeddiffError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Cancelled(Exception):
    """Raised inside a running task when the user asked it to stop."""
