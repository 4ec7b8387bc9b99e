"""anchorserve's HTTP layer (FastAPI), a thin adapter over `anchor_cache`."""
