"""Error kinds of the platform, each printed by the CLI as one line.

``UserError``: bad input or an unreachable service (exit 2). ``Interrupted``: a run
stopped by SIGINT/SIGTERM, closed cleanly; its message says how to resume (exit
128 + the signal: 130, 143). ``ForcedStop``: a second signal, leave now.
"""


class UserError(Exception):
    """Bad input or an unreachable service: the message is the whole story."""


class Interrupted(Exception):
    """A job stopped by a signal after closing its runs (KILLED); the message holds the --resume command."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ForcedStop(BaseException):
    """A second SIGINT/SIGTERM (or a stop past its grace period): leave now. A BaseException so that no
    ``except Exception`` on the way swallows it; ``args[0]`` is the signal number."""
