"""One exception hierarchy for the engine.

Every failure names its kind here; the server maps kinds to HTTP status codes in exactly one
table (`server/errors.py`, as TEI does with its error enum). Messages are meant for the caller:
they say what to fix and never name an absolute server path.
"""


class AnchorServeError(Exception):
    """Base class: every error the engine raises on purpose."""

    kind = "internal"


class ValidationError(AnchorServeError, ValueError):
    """The caller's input (task spec, text, label, option) is wrong; the message says how to fix it."""

    kind = "validation"


class ModelFilesMissing(AnchorServeError, FileNotFoundError):
    """The configured model's files are not on this machine (anchorserve never downloads weights
    from a hub): a failure of the server, not of a request naming an unknown model."""

    kind = "model_unavailable"


class CacheMismatchError(AnchorServeError):
    """A persisted artefact (anchor cache, β, task spec) is damaged, or belongs to another model,
    tokenizer or task. Caches are derivable, so the registry quarantines them and rebuilds."""

    kind = "cache_mismatch"


class NotFoundError(AnchorServeError, KeyError):
    """An unknown task (or other named resource)."""

    kind = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConflictError(AnchorServeError):
    """The request conflicts with the current state: a name that exists, a task being rebuilt, a
    full registry (max_tasks)."""

    kind = "conflict"


class PreconditionFailedError(AnchorServeError):
    """A conditional write (`If-Match`) named a revision that is no longer the current one."""

    kind = "precondition_failed"


class UnavailableError(AnchorServeError):
    """Not able to serve this now: still loading, shutting down, or a task that failed to load."""

    kind = "unavailable"


class Cancelled(AnchorServeError):
    """A job (β training, an analysis) stopped because it was asked to; it left nothing half-done."""

    kind = "cancelled"
