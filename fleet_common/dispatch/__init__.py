"""Dispatch: capability routing and the atomic claim."""
