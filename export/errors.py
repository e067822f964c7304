"""The one error type the export CLI turns into a one-line message and exit code 2."""


class ExportError(Exception):
    """A user-facing export failure (bad folder, bad flag, unwritable output); the repository is left as it was."""
