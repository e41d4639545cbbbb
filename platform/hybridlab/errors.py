"""User-facing errors of the platform: printed as one line by the CLI, exit 2."""


class UserError(Exception):
    """Bad input or an unreachable service: the message is the whole story."""
