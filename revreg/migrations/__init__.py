"""Alembic migrations for the registry database, shipped inside the package."""
