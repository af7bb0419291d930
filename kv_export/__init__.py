"""Versioned prediction export to a key-value store, and atomic publish of the live version."""
