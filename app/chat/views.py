import logging

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.paginator import Paginator
from django.http import HttpResponseForbidden
from django.db import IntegrityError, transaction
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from app.chat import throttle
from app.chat.forms import RoomForm
from app.chat.models import Message, Room
from app.chat.rendering import article_html_from
from app.websockets import websocket_absolute_url, websocket_reverse


def signup(request):
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # Several backends (django-axes' first): say which one vouches for the new user.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("chat:rooms")
    return render(request, "registration/signup.html", {"form": form})


log = logging.getLogger(__name__)

TOO_MANY_ROOMS = "You created many rooms recently. Try again in {} minutes."
ROOMS_UNAVAILABLE = "Rooms cannot be created right now. Try again in a few seconds."


def _create_room(request, form):
    """Save the room, or put the reason it was not created on the form: the
    per-user limit (CHAT_USER_ROOMS_PER_HOUR), or a name another request took
    between validation and INSERT. Returns (room or None, status, Retry-After)."""
    try:
        verdict = throttle.hit(throttle.rooms(), request.user.pk)
    except throttle.Unavailable as exc:
        log.warning("room creation refused: rate-limit store unavailable (%s)", exc)
        form.add_error(None, ROOMS_UNAVAILABLE)
        return None, 503, 5
    if not verdict.allowed:
        form.add_error(None, TOO_MANY_ROOMS.format(-(-verdict.retry_after // 60)))
        return None, 429, verdict.retry_after
    room = form.save(commit=False)
    room.created_by = request.user
    try:
        with transaction.atomic():
            room.save()
    except IntegrityError:
        if not Room.objects.filter(name=room.name).exists():
            raise
        log.info("room name %r was taken by a concurrent request", room.name)
        form.add_error("name", room.unique_error_message(Room, ["name"]))
        return None, 200, None
    return room, 302, None


@login_required
def rooms(request):
    form = RoomForm(request.POST or None)
    status, retry_after = 200, None
    if request.method == "POST" and form.is_valid():
        room, status, retry_after = _create_room(request, form)
        if room is not None:
            return redirect("chat:room", room_id=room.pk)
    page = Paginator(Room.objects.only("id", "name"), settings.CHAT_ROOMS_PER_PAGE).get_page(request.GET.get("page"))
    response = render(request, "chat/rooms.html", {"rooms": page, "page": page, "form": form}, status=status)
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


def can_delete(user, room) -> bool:
    return user.is_staff or (room.created_by_id is not None and room.created_by_id == user.pk)


@login_required
@require_POST
def delete_room(request, room_id):
    """The room's creator (or staff) deletes it with its messages; its open
    sockets on every worker close with "room deleted" (app/chat/signals.py)."""
    room = get_object_or_404(Room, pk=room_id)
    if not can_delete(request.user, room):
        # An answer, not PermissionDenied: that logs a traceback per refusal.
        return HttpResponseForbidden("Only the room's creator or staff can delete it.", content_type="text/plain")
    room.delete()
    return redirect("chat:rooms")


@login_required
def room(request, room_id):
    room = get_object_or_404(Room, pk=room_id)
    recent = list(
        Message.objects.filter(room=room).select_related("author").order_by("-seq")[: settings.CHAT_HISTORY]
    )[::-1]
    ws_path = websocket_reverse("ws_group_chat", args=[room.pk])
    return render(
        request,
        "chat/room.html",
        {
            "room": room,
            "articles": [article_html_from(m) for m in recent],
            # The page's reconnect cursor starts here: every message up to
            # this seq is shown or older than the history shown (room.js).
            "last_seq": recent[-1].seq if recent else 0,
            # The page connects with the path (htmx-ext-ws makes it ws/wss of
            # the current page, right behind any proxy); the absolute URL from
            # the Site domain is published for other clients and checked by
            # the black-box verifier against the host it talks to.
            "ws_path": ws_path,
            "ws_url": websocket_absolute_url(ws_path),
            "max_length": settings.CHAT_MAX_MESSAGE_LENGTH,
            "can_delete": can_delete(request.user, room),
        },
    )
