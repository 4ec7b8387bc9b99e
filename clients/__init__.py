"""Python and command-line clients for the anchorserve REST API; built in the server issue."""
