"""HTTP routers, one per resource; each only parses, calls a service and shapes the response."""
