"""The ledger is append-only in the database itself (PostgreSQL): no UPDATE of what an entry says, no DELETE.

Only the two SET_NULL links (usage_record, created_by) may change, so deleting a usage record or a staff user
still works. TRUNCATE (test teardown) is not a row operation and is unaffected.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION usage_ledger_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'usage_ledgerentry is append-only: entry % cannot be deleted', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.account_id IS DISTINCT FROM OLD.account_id
       OR NEW.amount IS DISTINCT FROM OLD.amount OR NEW.kind IS DISTINCT FROM OLD.kind
       OR NEW.reason IS DISTINCT FROM OLD.reason OR NEW.balance_after IS DISTINCT FROM OLD.balance_after
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'usage_ledgerentry is append-only: entry % cannot be changed', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE ON usage_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION usage_ledger_append_only();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS usage_ledger_append_only ON usage_ledgerentry;
DROP FUNCTION IF EXISTS usage_ledger_append_only();
"""


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD, params=None)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD, params=None)


class Migration(migrations.Migration):
    dependencies = [("usage", "0004_unsynced_index")]

    operations = [migrations.RunPython(forward, backward, elidable=False)]
