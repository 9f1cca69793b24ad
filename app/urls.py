from django.contrib import admin
from django.urls import include, path

from app import health, probes

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("startupz", probes.startupz, name="startupz"),
    path("accounts/", include("app.chat.account_urls")),
    path("admin/", admin.site.urls),
    path("", include("app.chat.urls")),
]

handler500 = "app.errors.server_error"
