"""The HTTP registry: `revreg serve` (FastAPI) and the client that makes every CLI verb remote."""
