"""System checks for projects that install the app: what the batch API needs from them.

The API's views take authentication, permissions, parsers, the schema class and the error
format from the project's `REST_FRAMEWORK` (DRF's global settings). These checks name what a
host project left at a DRF default that breaks the contract (CONTRACT.md), so
`manage.py check` says it before a request does.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core import checks

REQUIRED_APPS = ("rest_framework", "drf_spectacular", "channels")
PROBLEM_HANDLER = "batch.api.exceptions.problem_exception_handler"


def register() -> None:
    checks.register(check_required_apps, "batch")
    checks.register(check_rest_framework, "batch")
    checks.register(check_callbacks, "batch")


def check_required_apps(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    return [
        checks.Error(
            f"'{name}' must be in INSTALLED_APPS: the batch app's API and dashboard use it.",
            hint=f"Add '{name}' to INSTALLED_APPS (see the README, 'Add to an existing project').",
            id="batch.E001",
        )
        for name in REQUIRED_APPS
        if not apps.is_installed(name)
    ]


def check_rest_framework(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from drf_spectacular.openapi import AutoSchema
    from rest_framework.permissions import AllowAny
    from rest_framework.settings import api_settings

    found: list[checks.CheckMessage] = []
    # DRF resolves these dotted paths to classes and functions (its stubs type them as strings).
    permissions: list[Any] = list(api_settings.DEFAULT_PERMISSION_CLASSES)
    if not permissions or AllowAny in permissions:
        found.append(
            checks.Warning(
                "REST_FRAMEWORK['DEFAULT_PERMISSION_CLASSES'] lets anonymous requests reach the batch API.",
                hint="Use 'rest_framework.permissions.IsAuthenticated' (anonymous requests then get 401).",
                id="batch.W001",
            )
        )
    handler: Any = api_settings.EXCEPTION_HANDLER
    if f"{handler.__module__}.{handler.__qualname__}" != PROBLEM_HANDLER:
        found.append(
            checks.Warning(
                "REST_FRAMEWORK['EXCEPTION_HANDLER'] is not the batch app's: API errors will not be "
                "application/problem+json.",
                hint=f"Set REST_FRAMEWORK['EXCEPTION_HANDLER'] = '{PROBLEM_HANDLER}'.",
                id="batch.W002",
            )
        )
    schema: Any = api_settings.DEFAULT_SCHEMA_CLASS
    if not (isinstance(schema, type) and issubclass(schema, AutoSchema)):
        found.append(
            checks.Warning(
                "REST_FRAMEWORK['DEFAULT_SCHEMA_CLASS'] is not a drf-spectacular AutoSchema: /api/schema/ will fail.",
                hint="Set REST_FRAMEWORK['DEFAULT_SCHEMA_CLASS'] = 'batch.api.schema.ProblemAutoSchema'.",
                id="batch.W003",
            )
        )
    return found


def check_callbacks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.conf import settings

    allowed, secret = (
        getattr(settings, "BATCH_CALLBACK_ALLOWED_HOSTS", []),
        getattr(settings, "BATCH_CALLBACK_SECRET", ""),
    )
    if not allowed or secret:
        return []
    return [
        checks.Warning(
            "BATCH_CALLBACK_ALLOWED_HOSTS allows completion webhooks but BATCH_CALLBACK_SECRET is empty: "
            "receivers cannot tell the batch app's requests from forged ones.",
            hint="Set BATCH_CALLBACK_SECRET to a long random string and share it with the receivers.",
            id="batch.W004",
        )
    ]
