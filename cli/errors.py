"""Errors the CLI reports as one line (no traceback)."""


class UserError(Exception):
    """Something the user can fix: a bad argument, a missing or malformed file."""
