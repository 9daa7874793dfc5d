"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input from the user (prompt, path, argument); the message says what to change."""
