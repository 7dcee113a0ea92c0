"""Throttling of submissions and resizes; the rate is read per request so settings can change it."""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import UserRateThrottle


class SubmitRateThrottle(UserRateThrottle):
    """Per user (per IP when anonymous): BATCH_SUBMIT_THROTTLE_RATE, e.g. "120/min"; empty = off."""

    scope = "batch_submit"

    def get_rate(self) -> str | None:
        return settings.BATCH_SUBMIT_THROTTLE_RATE or None


class ResizeRateThrottle(UserRateThrottle):
    """Per user: BATCH_RESIZE_THROTTLE_RATE (each resize writes an audit row); empty = off."""

    scope = "batch_resize"

    def get_rate(self) -> str | None:
        return settings.BATCH_RESIZE_THROTTLE_RATE or None
