"""User-facing errors: each carries one line that names the offending file or field."""


class RetrievalError(Exception):
    """An error caused by the user's input (a file, a config field, a query).

    The command-line entry point prints ``str(error)`` as a single line and exits with
    status 2 instead of showing a traceback.
    """


class ConfigError(RetrievalError):
    """A config file or ``--set`` override is invalid."""


class DataError(RetrievalError):
    """An input data file (captions, images, shards, vectors) is missing or malformed."""


class QueryError(RetrievalError):
    """A search query cannot be answered (e.g. none of its words are known)."""


def one_line_reason(exc: BaseException, *, with_type: bool = False, limit: int = 200) -> str:
    """The reason an exception gives, folded onto one line (at most ``limit`` characters), or its type name.

    ``with_type`` puts the exception's type in front ("UnicodeDecodeError: ..."), for errors from a
    library whose messages do not say what went wrong on their own.
    """
    reason = " ".join(str(exc).split())[:limit]
    if not reason:
        return type(exc).__name__
    return f"{type(exc).__name__}: {reason}" if with_type else reason
