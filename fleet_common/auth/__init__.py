"""Tokens (admin, join, agent) and the audit log."""
