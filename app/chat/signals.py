"""Django signals that revoke open sockets (app/chat/revocation.py).

* logout (`user_logged_out`): that session's sockets close (4401);
* a user saved with another password or `is_active` changed, and a user
  deleted: that user's sockets are re-checked against the database (4401 if
  its session no longer matches, 4403 if inactive);
* a room deleted: its sockets close (4404).

Each event is published once the transaction commits (a rolled-back change
revokes nothing, and the re-check reads the committed state). What bypasses
signals (QuerySet.update, raw SQL, a session row deleted directly) is caught
by the periodic re-check.
"""
from __future__ import annotations

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save

from app.chat import revocation

CREDENTIAL_FIELDS = {"password", "is_active"}
_CHANGED = "_chat_credentials_changed"  # set on the instance between pre_save and post_save


def on_logout(sender, request=None, user=None, **kwargs):
    session = getattr(request, "session", None)
    tag = revocation.session_tag(getattr(session, "session_key", None))
    if tag:
        transaction.on_commit(lambda: revocation.publish({"session": tag}))


def before_user_save(sender, instance, raw=False, update_fields=None, **kwargs):
    if raw or instance.pk is None:
        return
    if update_fields is not None and not CREDENTIAL_FIELDS & set(update_fields):
        return  # e.g. last_login at every login: no query
    before = sender._default_manager.filter(pk=instance.pk).values_list("password", "is_active").first()
    now = (instance.password, getattr(instance, "is_active", True))
    setattr(instance, _CHANGED, before is not None and tuple(before) != now)


def after_user_save(sender, instance, created=False, raw=False, **kwargs):
    if instance.__dict__.pop(_CHANGED, False):
        user_id = instance.pk
        transaction.on_commit(lambda: revocation.publish({"user": user_id}))


def after_user_delete(sender, instance, **kwargs):
    user_id = instance.pk
    transaction.on_commit(lambda: revocation.publish({"user": user_id}))


def after_room_delete(sender, instance, **kwargs):
    room_id = instance.pk
    transaction.on_commit(lambda: revocation.publish({"room": room_id}))


def connect() -> None:
    from app.chat.models import Room

    user_model = settings.AUTH_USER_MODEL
    user_logged_out.connect(on_logout, dispatch_uid="chat.revoke.logout")
    pre_save.connect(before_user_save, sender=user_model, dispatch_uid="chat.revoke.user.pre_save")
    post_save.connect(after_user_save, sender=user_model, dispatch_uid="chat.revoke.user.post_save")
    post_delete.connect(after_user_delete, sender=user_model, dispatch_uid="chat.revoke.user.delete")
    post_delete.connect(after_room_delete, sender=Room, dispatch_uid="chat.revoke.room.delete")
