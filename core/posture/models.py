"""Tables of core.posture (filled in by its package)."""
