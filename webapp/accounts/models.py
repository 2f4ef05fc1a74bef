"""Accounts: a custom User from the first migration, so it can grow without pain."""

from django.contrib.auth.models import AbstractUser


class User(AbstractUser):
    """A person (or service account) who owns datasets, jobs and adapters."""

    class Meta:
        db_table = "accounts_user"
