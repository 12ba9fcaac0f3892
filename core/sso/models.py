"""Tables of core.sso (filled in by its package)."""
