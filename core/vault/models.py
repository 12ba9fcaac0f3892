"""Tables of core.vault (filled in by its package)."""
