from django.apps import AppConfig
from django.db.models.signals import post_migrate


def sync_site_domain(sender, using="default", **kwargs):
    """Keep the Sites row in step with SITE_DOMAIN on every migrate."""
    from django.conf import settings
    from django.contrib.sites.models import Site

    Site.objects.using(using).update_or_create(
        pk=settings.SITE_ID, defaults={"domain": settings.SITE_DOMAIN, "name": settings.SITE_DOMAIN}
    )
    Site.objects.clear_cache()


class ChatConfig(AppConfig):
    name = "app.chat"
    label = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        post_migrate.connect(sync_site_domain, sender=self)
        # Logout, password change, deactivation, deleted users and rooms
        # close the open sockets they concern (app/chat/revocation.py).
        from app.chat import signals

        signals.connect()
