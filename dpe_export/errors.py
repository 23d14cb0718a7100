"""Errors that dpe-export reports to the user as one line, without a traceback."""


class DPEExportError(Exception):
    """A problem with the user's input or environment, described in one line.

    The CLI prints ``Error: <message>`` to stderr and exits with status 1.
    """

    def __str__(self) -> str:
        # A message must fit on one line: fold any embedded line breaks.
        return " ".join(super().__str__().split())


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (cut at `limit` characters), else its type's name:
    how a library's error is quoted inside one of ours."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__


class UsageError(DPEExportError):
    """Options that contradict each other or lack a companion: the CLI reports it as a usage error (exit 2,
    pointing at --help)."""
