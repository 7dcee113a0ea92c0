"""`GET /api/batches/{id}/export/?as=jsonl|csv`: every item of a batch, streamed (`batch.export`).

A mixin of `views.BatchViewSet`: the batch's visibility decides (404), as for viewing it. One user
streams at most BATCH_MAX_CONCURRENT_EXPORTS_PER_USER exports at once per process (429 beyond). The
client's `Accept` is not negotiated: the body is the format `as` names, and errors are problem
details whatever the client accepts (a browser following a download link sends `text/html`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adrf.viewsets import GenericViewSet
from django.conf import settings
from django.http import HttpRequest, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

from batch import export
from batch.api import concurrency
from batch.models import BatchJob

EXPORT_RETRY_AFTER_SECONDS = 5.0  # a large export streams for seconds


class ExportFormatSerializer(serializers.Serializer[dict[str, Any]]):
    """`?as=`: `jsonl` (default) or `csv`. Built in get_fields: `as` is a Python keyword."""

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {
            "as": serializers.ChoiceField(
                choices=list(export.CONTENT_TYPES), default="jsonl", help_text="jsonl (default) or csv."
            )
        }


class FirstRenderer(BaseContentNegotiation):
    """The view's first renderer (JSON) for its problem responses, whatever `Accept` says."""

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return next(iter(parsers), None)

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class ExportActions(GenericViewSet):
    """`export` for `BatchViewSet` (which provides the queryset and permissions)."""

    @extend_schema(
        parameters=[ExportFormatSerializer],
        responses={
            (200, "application/x-ndjson"): OpenApiResponse(
                OpenApiTypes.BINARY, description="One JSON object per item, in index order."
            ),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.BINARY, description="A header row, then one row per item."),
        },
        description="Every item of the batch (index, status, attempts, params, result, error; source_index in a "
        "retry batch) as an attachment, streamed in index order. CSV flattens params and result one level.",
    )
    @action(detail=True, methods=["get"], content_negotiation_class=FirstRenderer)
    def export(self, request: Request, pk: str) -> StreamingHttpResponse:
        serializer = ExportFormatSerializer(data=request.query_params)
        serializer.is_valid(raise_exception=True)
        batch = self.get_object()
        return streamed_export(request._request, batch, serializer.validated_data["as"])


def streamed_export(request: HttpRequest, batch: BatchJob, fmt: str) -> StreamingHttpResponse:
    """The export response, holding one of the user's BATCH_MAX_CONCURRENT_EXPORTS_PER_USER
    slots until it is closed (429 `Throttled` when none is free)."""
    limit = settings.BATCH_MAX_CONCURRENT_EXPORTS_PER_USER
    release = concurrency.exports.take(request.user, limit=limit, retry_after=EXPORT_RETRY_AFTER_SECONDS)
    try:
        return export.streaming_response(request, batch, fmt, on_close=release)
    except BaseException:
        release()
        raise
