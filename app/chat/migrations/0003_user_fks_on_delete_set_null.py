"""ON DELETE SET NULL in PostgreSQL for the two foreign keys to the user
(chat_message.author_id, chat_room.created_by_id).

Django (5.2: no `db_on_delete` yet) implements `on_delete=SET_NULL` in Python:
the deletion collector runs UPDATE ... SET author_id = NULL for the user's
rows, then DELETEs the user, and the constraint it creates is ON DELETE NO
ACTION, DEFERRABLE INITIALLY DEFERRED (checked at commit). A message the
user's own socket commits between that UPDATE and the DELETE (the batch
writer, app/chat/writer.py) still references the user, so the check fails
and the delete is rolled back: an operator's `user.delete()` failed now and
then while the user was talking (tests/integration/test_user_delete_race.py
forces that interleaving). With ON DELETE SET NULL the DELETE itself nulls
every row that references the user when it runs, including rows committed
after the collector's UPDATE. The models keep on_delete=SET_NULL (SQLite, and
the collector's own UPDATE, which stays harmless); nothing changes in the
model state, so this is invisible to makemigrations.

Only on PostgreSQL (SQLite, the dev default, keeps Django's constraint). The
constraint names are Django's generated ones, read from the catalog; each is
dropped and re-added under the same name, still DEFERRABLE INITIALLY DEFERRED
as Django makes them, in one ALTER TABLE per table. The re-added constraint
validates the existing rows (a scan of each table under an ACCESS EXCLUSIVE
lock, inside the migration's transaction). The reverse restores Django's
ON DELETE NO ACTION.

A later migration that alters either field (AlterField on author/created_by)
would have Django re-create the constraint without ON DELETE: the test above
checks the constraints of a fully migrated database and fails then.
"""
from django.db import migrations

FIELDS = (("Message", "author"), ("Room", "created_by"))

FIND_CONSTRAINT = """
SELECT con.conname FROM pg_constraint con
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
WHERE con.contype = 'f' AND cardinality(con.conkey) = 1
  AND con.conrelid = %s::regclass AND a.attname = %s AND con.confrelid = %s::regclass
"""


def set_on_delete(action: str):
    def run(apps, schema_editor):
        connection = schema_editor.connection
        if connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for model_name, field_name in FIELDS:
            field = apps.get_model("chat", model_name)._meta.get_field(field_name)
            table, column = field.model._meta.db_table, field.column
            target_table, target_column = field.related_model._meta.db_table, field.target_field.column
            with connection.cursor() as cursor:
                cursor.execute(FIND_CONSTRAINT, [table, column, target_table])
                names = [row[0] for row in cursor.fetchall()]
            if len(names) != 1:
                raise RuntimeError(f"expected one foreign key on {table}.{column} to {target_table}, found {names}")
            name = quote(names[0])
            schema_editor.execute(
                f"ALTER TABLE {quote(table)} DROP CONSTRAINT {name}, "
                f"ADD CONSTRAINT {name} FOREIGN KEY ({quote(column)}) "
                f"REFERENCES {quote(target_table)} ({quote(target_column)}) "
                f"ON DELETE {action} DEFERRABLE INITIALLY DEFERRED"
            )

    return run


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0002_room_last_seq_message_seq"),
    ]

    operations = [
        migrations.RunPython(set_on_delete("SET NULL"), set_on_delete("NO ACTION")),
    ]
