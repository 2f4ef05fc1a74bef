#!/usr/bin/env python
"""Django's command-line utility for administrative tasks.

Without DJANGO_SETTINGS_MODULE only the development commands run, on the local settings
(DEBUG on, a published secret key, SQLite and a filesystem broker under data/); any other
command asks for settings, so an operator who forgot them never runs one against a
deployment with DEBUG and a key anyone can read.
"""

import os
import sys

# What a developer runs on their own machine (and what `make run` and the README's quick
# start use): the embedded service, tests, migrations, a shell, and the operator commands
# that set up the embedded service.
DEVELOPMENT_COMMANDS = {
    "runserver",
    "runstudio",
    "test",
    "migrate",
    "makemigrations",
    "showmigrations",
    "shell",
    "check",
    "create_user",
    "createsuperuser",
    "prepare_base_model",
    "register_base_model",
    "help",
    "version",
}


def main() -> None:
    if "DJANGO_SETTINGS_MODULE" not in os.environ:
        command = sys.argv[1] if len(sys.argv) > 1 else "help"
        if command.lstrip("-") not in DEVELOPMENT_COMMANDS:
            sys.exit(
                f"manage.py {command}: set DJANGO_SETTINGS_MODULE (webapp.settings.production "
                "for a deployment; webapp.settings.local for development). Without it only "
                f"these development commands run: {', '.join(sorted(DEVELOPMENT_COMMANDS))}."
            )
        os.environ["DJANGO_SETTINGS_MODULE"] = "webapp.settings.local"
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
