"""Forgejo building blocks: signatures, events, references, client, and the fake itself."""
