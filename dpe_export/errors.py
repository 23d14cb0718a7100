"""Errors that dpe-export reports to the user as one line, without a traceback."""


class DPEExportError(Exception):
    """A problem with the user's input or environment, described in one line.

    The CLI prints ``Error: <message>`` to stderr and exits with status 1.
    """

    def __str__(self) -> str:
        # A message must fit on one line: fold any embedded line breaks.
        return " ".join(super().__str__().split())
