from django.conf import settings
from django.db import models


class Room(models.Model):
    name = models.CharField(max_length=80, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    # The cap is enforced on input (CHAT_MAX_MESSAGE_LENGTH); TextField keeps
    # the column independent of that setting.
    body = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Replay on reconnect reads "messages of a room after id N".
        indexes = [models.Index(fields=["room", "id"], name="chat_msg_room_id")]
        ordering = ["id"]

    def __str__(self):
        return f"{self.author_id}@{self.room_id}: {self.body[:30]}"
