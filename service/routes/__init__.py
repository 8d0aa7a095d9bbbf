"""HTTP routers, one per file."""
