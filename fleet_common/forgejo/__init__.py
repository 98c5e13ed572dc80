"""Forgejo integration building blocks that need no database: signatures, events, references
and the REST client. The webhook endpoint and the write-back tasks build on these."""
