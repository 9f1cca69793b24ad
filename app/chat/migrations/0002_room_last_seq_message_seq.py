"""Per-room message sequence numbers (see Message and app/chat/writer.py).

Existing messages are numbered 1, 2, 3, ... per room in id order (all of them
are committed, so id order is as good as any), and each room's last_seq is
set to its highest seq. The replay index on (room, id) becomes the unique
(room, seq) constraint, which the replay and resync queries use.

Not backward compatible with the previous release's writer: once this has run,
an old worker's INSERT (no seq) fails, so during a rolling deploy the old
workers answer `not_saved` (the user sends again) until they are replaced;
nothing is stored without a seq.
"""
from django.db import migrations, models

NUMBER_MESSAGES = """
UPDATE chat_message SET seq = numbered.rn
FROM (SELECT id, row_number() OVER (PARTITION BY room_id ORDER BY id) AS rn FROM chat_message) AS numbered
WHERE chat_message.id = numbered.id
"""
SET_LAST_SEQ = """
UPDATE chat_room SET last_seq = COALESCE((SELECT MAX(m.seq) FROM chat_message m WHERE m.room_id = chat_room.id), 0)
"""


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0001_initial"),
    ]

    operations = [
        migrations.AddField(model_name="room", name="last_seq", field=models.BigIntegerField(default=0)),
        migrations.AddField(model_name="message", name="seq", field=models.BigIntegerField(null=True)),
        migrations.RunSQL(NUMBER_MESSAGES, migrations.RunSQL.noop),
        migrations.RunSQL(SET_LAST_SEQ, migrations.RunSQL.noop),
        migrations.AlterField(model_name="message", name="seq", field=models.BigIntegerField()),
        migrations.RemoveIndex(model_name="message", name="chat_msg_room_id"),
        migrations.AddConstraint(
            model_name="message",
            constraint=models.UniqueConstraint(fields=("room", "seq"), name="chat_msg_room_seq"),
        ),
        migrations.AlterModelOptions(name="message", options={"ordering": ["room", "seq"]}),
    ]
