"""Alembic migrations; ``fleet_common.migrate.upgrade`` runs them."""
