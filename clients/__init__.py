"""Python and command-line clients for the anchorserve REST API."""

from clients.client import AnchorServeClient, AnchorServeError, AsyncAnchorServeClient

__all__ = ["AnchorServeClient", "AnchorServeError", "AsyncAnchorServeClient"]
