"""The SQL-backed registry: models, migrations, blob stores, the registry service and the
hash-chained audit log."""
