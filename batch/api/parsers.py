"""JSON parsing with a size limit: DRF streams the body past Django's own check."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from rest_framework.parsers import JSONParser

from batch.api.exceptions import PayloadTooLarge


class LimitedJSONParser(JSONParser):
    """Refuses (413) a body longer than DATA_UPLOAD_MAX_MEMORY_SIZE before decoding it."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        limit: int | None = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is None:
            return super().parse(stream, media_type, parser_context)
        request = (parser_context or {}).get("request")
        declared = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
        body = b"" if declared > limit else stream.read(limit + 1)
        if declared > limit or len(body) > limit:
            raise PayloadTooLarge(f"The request body exceeds {limit} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE).")
        return super().parse(io.BytesIO(body), media_type, parser_context)
