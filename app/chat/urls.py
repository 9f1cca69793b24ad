from django.urls import path

from app.chat import views

app_name = "chat"
urlpatterns = [
    path("", views.rooms, name="rooms"),
    path("rooms/<int:room_id>/", views.room, name="room"),
    path("rooms/<int:room_id>/delete/", views.delete_room, name="delete_room"),
]
