#!/usr/bin/env python
"""Django's command-line utility."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "app.settings")
    from app.env import ConfigError
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as exc:
        # A bad or missing environment variable: one line naming it, no traceback.
        sys.exit(f"Configuration error: {exc}")


if __name__ == "__main__":
    main()
