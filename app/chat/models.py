from django.conf import settings
from django.db import models, transaction
from django.db.models import F


class Room(models.Model):
    name = models.CharField(max_length=80, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    # The seq of the room's newest message. Raised in the transaction that
    # inserts messages, under this row's lock (app/chat/writer.py), so a
    # room's seqs are gap-free and commit in order.
    last_seq = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Message(models.Model):
    """A chat message.

    `seq` numbers a room's messages 1, 2, 3, ... in commit order (not `id`:
    ids are taken at INSERT and two workers can commit 100 before 99). It is
    assigned under the room row's lock in the inserting transaction, so the
    messages any reader can see are always seqs 1..N of the room with none
    missing: "everything after seq N" is a safe reconnect cursor.
    """

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.BigIntegerField()
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    # The cap is enforced on input (CHAT_MAX_MESSAGE_LENGTH); TextField keeps
    # the column independent of that setting.
    body = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Replay and resync read "messages of a room after seq N" (this index).
        constraints = [models.UniqueConstraint(fields=["room", "seq"], name="chat_msg_room_seq")]
        ordering = ["room", "seq"]

    def __str__(self):
        return f"{self.author_id}@{self.room_id}#{self.seq}: {self.body[:30]}"

    def save(self, *args, **kwargs):
        """A message saved one by one (shell, admin, tests) gets its seq the
        same way the batch writer assigns it: under the room row's lock."""
        if self.seq is not None or self.pk is not None:
            return super().save(*args, **kwargs)
        with transaction.atomic():
            Room.objects.filter(pk=self.room_id).update(last_seq=F("last_seq") + 1)
            self.seq = Room.objects.filter(pk=self.room_id).values_list("last_seq", flat=True).get()
            return super().save(*args, **kwargs)
