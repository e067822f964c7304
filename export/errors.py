"""The one error type the export CLI turns into a one-line message and exit code 2."""


class ExportError(Exception):
    """A user-facing export failure (bad folder, bad flag, unwritable output); the repository is left as it was."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A foreign exception's first line, for a one-line ExportError (its type's name when it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
