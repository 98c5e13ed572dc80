"""REST resources, one module per domain: views and their schemas."""
