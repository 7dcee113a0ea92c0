"""`GET /api/batches/{id}/export/?as=jsonl|csv`: every item of a batch, streamed (`batch.export`).

A mixin of `views.BatchViewSet`: the batch's visibility decides (404), as for viewing it. The
client's `Accept` is not negotiated: the body is the format `as` names, and errors are problem
details whatever the client accepts (a browser following a download link sends `text/html`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adrf.viewsets import GenericViewSet
from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import BaseParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

from batch import export


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
        return export.streaming_response(request._request, batch, serializer.validated_data["as"])
