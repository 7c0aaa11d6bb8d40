# A GIN index for memory retrieval's full-text search (PostgreSQL only; SQLite uses a plain scan).

from django.db import migrations

INDEX = "msg_content_fts_idx"


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    # Same expression as SearchVector("content", config="english") in conversations/memory.py.
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON conversations_message "
        "USING gin (to_tsvector('english'::regconfig, COALESCE(content, '')))"
    )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("conversations", "0002_generation_lease")]

    operations = [migrations.RunPython(create_index, drop_index)]
