"""Schema management: migrations reach exactly the models, and a stale schema is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from revreg.registry.db import HEAD, SchemaError, alembic_config, make_engine, resolve, upgrade
from revreg.registry.models import Base
from revreg.registry.service import Registry


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_upgrading_an_empty_database_gives_exactly_the_models(backend: str, request, tmp_path: Path):
    url = str(tmp_path / "r") if backend == "sqlite" else request.getfixturevalue("pg_url")
    location = resolve(url)
    if location.directory:
        location.directory.mkdir()
    engine = make_engine(location)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    engine.dispose()


def test_head_constant_matches_the_migration_scripts(tmp_path: Path):
    engine = make_engine(resolve(str(tmp_path)))
    assert ScriptDirectory.from_config(alembic_config(engine)).get_current_head() == HEAD


def test_commands_refuse_a_schema_that_is_behind_and_name_the_fix(registry_location, run):
    location, store = registry_location
    reg = Registry.init(location, store)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaError, match=r"revision 0000, this revreg needs 0003: run `revreg db upgrade`"):
        Registry.open(location)
    result = run("ls", "--registry", location)
    assert result.exit_code == 2 and "run `revreg db upgrade`" in result.stderr
    assert run("db", "current", "--registry", location).exit_code == 1
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0003'"))
    assert run("db", "current", "--registry", location).exit_code == 0
    reg.engine.dispose()


def test_missing_registry_says_how_to_create_one(run, tmp_path: Path):
    result = run("ls", "--registry", tmp_path / "nowhere")
    assert result.exit_code == 2 and "create one with `revreg init`" in result.stderr
