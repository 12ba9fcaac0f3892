"""Tables of core.alerts (filled in by its package)."""
