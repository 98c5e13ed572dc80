"""Fakes of the services Fleet does not own (network edges only)."""
