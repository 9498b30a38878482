"""The migrations match the models."""

import io

import pytest
from django.core.management import call_command
from django.db import connection

from rooms.models import Message


@pytest.mark.django_db
def test_models_have_no_changes_missing_a_migration():
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exited:
        pytest.fail(f"a model change has no migration (makemigrations --check):\n{out.getvalue()}")
        raise AssertionError from exited


@pytest.mark.django_db
def test_messages_carry_one_index_by_room_the_one_history_walks():
    # Every message stored updates every index of its table.
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, Message._meta.db_table)
    by_room = [
        c["columns"] for c in constraints.values() if c["index"] and c["columns"][0] == "room_id"
    ]
    assert by_room == [["room_id", "id"]]
