"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class BnprobeError(Exception):
    """An error caused by the user's input (bad file, bad option, bad data).

    The CLI shows ``Error: <message>`` and exits with status 2; a traceback is shown only
    with ``--debug``.
    """


class SharedError(BnprobeError):
    """A user error raised on every process of a torchrun job at once.

    See :func:`bnprobe.distributed.shared_errors`: process 0 reports it, the others exit
    quietly with the same status.
    """
