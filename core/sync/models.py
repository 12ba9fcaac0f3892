"""Tables of core.sync (filled in by its package)."""
