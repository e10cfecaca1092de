"""The one user-facing exception type.

Library code raises :class:`SdgenError` for anything a user can fix (a missing file, a bad flag, a
checkpoint that does not fit the config). The CLI prints its message as one line and exits with
code 2; programming errors stay ordinary exceptions.
"""


class SdgenError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
