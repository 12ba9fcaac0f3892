"""Tables of core.providers (filled in by its package)."""
