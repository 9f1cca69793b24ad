from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.shortcuts import get_object_or_404, redirect, render

from app.chat.forms import RoomForm
from app.chat.models import Message, Room
from app.chat.rendering import article_html_from
from app.websockets import websocket_absolute_url, websocket_reverse


def signup(request):
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("chat:rooms")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def rooms(request):
    form = RoomForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        room = form.save(commit=False)
        room.created_by = request.user
        room.save()
        return redirect("chat:room", room_id=room.pk)
    return render(request, "chat/rooms.html", {"rooms": Room.objects.all(), "form": form})


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
        },
    )
