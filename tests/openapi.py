"""The OpenAPI document `/api/schema/` serves, for schemathesis. It needs a token, which test
collection cannot have, so it is generated in-process (the same generator the view runs)."""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from django.core.wsgi import get_wsgi_application
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer


def load_schema() -> Any:
    raw = json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))
    loaded = schemathesis.openapi.from_dict(raw)
    loaded.app, loaded.location = get_wsgi_application(), "/api/schema/"
    return loaded
