"""One exception hierarchy for the engine.

The server maps these types to HTTP status codes in exactly one table (as TEI does with its
error enum), so every engine failure names its kind here instead of raising bare ValueErrors.
"""


class AnchorServeError(Exception):
    """Base class: every error the engine raises on purpose."""

    kind = "internal"


class ValidationError(AnchorServeError, ValueError):
    """The caller's input (task spec, text, label, option) is wrong; the message says how to fix it."""

    kind = "validation"


class ModelNotFoundError(AnchorServeError, FileNotFoundError):
    """The model is not on this machine; anchorserve never downloads weights from a hub."""

    kind = "model_not_found"


class CacheMismatchError(AnchorServeError):
    """A persisted anchor cache does not belong to this model, tokenizer or task."""

    kind = "cache_mismatch"


class NotFoundError(AnchorServeError, KeyError):
    """An unknown task (or other named resource)."""

    kind = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
