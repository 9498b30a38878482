"""The migrations match the models."""

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_models_have_no_changes_missing_a_migration():
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exited:
        pytest.fail(f"a model change has no migration (makemigrations --check):\n{out.getvalue()}")
        raise AssertionError from exited
