"""The batch API: submit, list, inspect, resize, cancel with a bounded drain, list items.

`BatchViewSet` is an `adrf` viewset: DRF's authentication, permissions, throttling, content
negotiation and our problem-details handler apply as usual, the sync actions run in a thread
(`sync_to_async`, as Django runs sync views under ASGI), and the two cancel actions are
coroutines: a request waiting for a drain holds no thread, only a parked task (see `drain`).
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from adrf.viewsets import GenericViewSet
from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import exceptions, serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle

from batch import selectors, services
from batch.api import concurrency, drain
from batch.api.exceptions import Conflict, DrainTimeout, PayloadTooLarge
from batch.api.export import ExportActions
from batch.api.lifecycle import LifecycleActions
from batch.api.limits import CancelRateThrottle
from batch.api.pagination import BatchPagination, ItemPagination
from batch.api.permissions import BatchPermission
from batch.api.serializers import (
    BatchFilterSerializer,
    BatchResizeSerializer,
    BatchRetrySerializer,
    BatchSerializer,
    BatchSubmitSerializer,
    CallbackSerializer,
    DrainSerializer,
    ItemFilterSerializer,
    ItemSerializer,
)
from batch.api.throttling import ResizeRateThrottle, SubmitRateThrottle
from batch.models import BatchJob, BatchStatus

IDEMPOTENCY_HEADER = "Idempotency-Key"
CONTROL_ACTIONS = ("cancel", "pause", "resume")  # POST actions that take no submission body
_CANCEL_SCHEMA = extend_schema(
    parameters=[DrainSerializer],
    request=None,
    responses={200: BatchSerializer},
    description="Cancel and wait up to drain_timeout seconds for the running items to stop: "
    "200 cancelled, 409 already finished, 504 still cancelling (the cancel goes on).",
)


def _validated(serializer_class: type[serializers.Serializer[Any]], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


@extend_schema_view(
    list=extend_schema(parameters=[BatchFilterSerializer]),
    create=extend_schema(
        request=BatchSubmitSerializer,
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
        responses={
            201: BatchSerializer,
            200: OpenApiResponse(BatchSerializer, description="Replay of an Idempotency-Key: the first batch."),
        },
    ),
    partial_update=extend_schema(request=BatchResizeSerializer, responses={200: BatchSerializer}),
    destroy=_CANCEL_SCHEMA,
    cancel=_CANCEL_SCHEMA,
    items=extend_schema(parameters=[ItemFilterSerializer], responses={200: ItemSerializer(many=True)}),
    callbacks=extend_schema(responses={200: CallbackSerializer(many=True)}),
)
class BatchViewSet(LifecycleActions, ExportActions, GenericViewSet):
    """Your batches; every user's with the `batch.view_batchjob` permission (superusers have it).
    A batch you may not see answers 404; one you see but may not change answers 403."""

    serializer_class = BatchSerializer
    pagination_class = BatchPagination
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self) -> QuerySet[BatchJob]:
        return selectors.batches_for(self.request.user).select_related("created_by")

    def get_permissions(self) -> list[Any]:
        return [*super().get_permissions(), BatchPermission()]

    def get_throttles(self) -> list[BaseThrottle]:
        if self.action in ("destroy", *CONTROL_ACTIONS):
            return [CancelRateThrottle()]
        if self.action == "partial_update":
            return [ResizeRateThrottle()]
        return [SubmitRateThrottle()] if self.action in ("create", "retry") else []

    def get_serializer_class(self) -> type[serializers.BaseSerializer[Any]]:
        # By method, not action: the browsable API renders its forms from the list/detail views.
        if self.action == "items":
            return ItemSerializer
        if self.action == "callbacks":
            return CallbackSerializer
        if self.action == "retry":
            return BatchRetrySerializer
        if self.request is not None and self.request.method == "POST" and self.action not in CONTROL_ACTIONS:
            return BatchSubmitSerializer
        if self.request is not None and self.request.method in ("PATCH", "PUT"):
            return BatchResizeSerializer
        return BatchSerializer

    def _render(self, batch: BatchJob) -> dict[str, Any]:
        return dict(BatchSerializer(batch, context=self.get_serializer_context()).data)

    def list(self, request: Request) -> Response:
        """Batches, newest first; filter with ?status= and ?handler=."""
        filters = _validated(BatchFilterSerializer, request.query_params)
        batches = self.get_queryset().filter(**filters)
        page = self.paginate_queryset(batches)
        data = BatchSerializer(page, many=True, context=self.get_serializer_context()).data
        return cast(Response, self.get_paginated_response(data))

    def retrieve(self, request: Request, pk: str) -> Response:
        """One batch with its counters."""
        return Response(self._render(self.get_object()))

    def create(self, request: Request) -> Response:
        """Submit a batch; with Idempotency-Key a retry returns the first batch (200)."""
        with concurrency.submits.hold(request.user, limit=settings.BATCH_MAX_CONCURRENT_SUBMITS_PER_USER):
            return self._create(request)  # the body is parsed inside: parsing is the expensive part

    def _create(self, request: Request) -> Response:
        body = _validated(BatchSubmitSerializer, request.data)
        key = request.headers.get(IDEMPOTENCY_HEADER) or None
        if key is not None and (len(key) > 255 or not key.isprintable()):
            raise exceptions.ValidationError({IDEMPOTENCY_HEADER: ["At most 255 printable characters."]})
        try:
            result = services.submit_batch(**body, created_by=request.user, idempotency_key=key)
        except services.SubmitError as exc:
            if exc.too_many_items:
                raise PayloadTooLarge("Too many items in one batch.", errors=exc.errors) from None
            raise exceptions.ValidationError(exc.errors) from None
        data = self._render(result.batch)
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response(data, status=code, headers={"Location": data["url"]})

    def partial_update(self, request: Request, pk: str) -> Response:
        """Change max_parallel of an unfinished batch; running workers pick it up."""
        body = _validated(BatchResizeSerializer, request.data)
        batch = self.get_object()
        try:
            resized = services.resize_batch(batch_id=batch.pk, max_parallel=body["max_parallel"], by=request.user)
        except services.InvalidValue as exc:
            raise exceptions.ValidationError({exc.field_name: [exc.message]}) from None
        except BatchJob.DoesNotExist:
            raise exceptions.NotFound() from None
        if resized is None:
            raise Conflict("The batch has finished; it can no longer be resized.")
        return Response(self._render(self.get_object()))

    async def destroy(self, request: Request, pk: str) -> Response:
        """Cancel the batch and wait for its running items to stop."""
        return await self._cancel(request)

    @action(detail=True, methods=["post"])  # type: ignore[type-var]
    async def cancel(self, request: Request, pk: str) -> Response:
        """Cancel the batch and wait for its running items to stop (same as DELETE)."""
        return await self._cancel(request)

    async def _cancel(self, request: Request) -> Response:
        params = _validated(DrainSerializer, request.query_params)
        timeout = params.get("drain_timeout", settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS)
        limit = settings.BATCH_MAX_WAITING_CANCELS_PER_USER
        with concurrency.cancel_waits.hold(request.user, limit=limit, retry_after=timeout):
            return await self._cancel_and_wait(drain_seconds=timeout)

    async def _cancel_and_wait(self, *, drain_seconds: float) -> Response:
        # Every read gives its connection back: the wait below holds none (drain.released).
        batch = await drain.released(self.get_object)()  # visibility before state: 404 first
        result = await drain.released(services.request_cancel)(batch_id=batch.pk, by=self.request.user)
        if result.outcome is services.CancelOutcome.NOT_FOUND:
            raise exceptions.NotFound()
        if result.outcome is services.CancelOutcome.TERMINAL:
            status = result.batch.status if result.batch else batch.status  # as it is now, not as read before
            raise Conflict(f"The batch has already finished ({status}).")
        waited = await drain.wait_while_cancelling(batch.pk, fetch=lambda: self._fresh(batch.pk), seconds=drain_seconds)
        if waited is None:
            raise exceptions.NotFound()
        data = await drain.released(self._render)(waited)
        if waited.status == BatchStatus.CANCELLING:
            raise DrainTimeout(
                f"{waited.running_items} item(s) still running after {drain_seconds:g}s; the cancel goes on.",
                extra={"batch": data, "running_items": waited.running_items},
            )
        return Response(data)

    def _fresh(self, batch_id: uuid.UUID) -> BatchJob | None:
        return self.get_queryset().filter(pk=batch_id).first()

    @action(detail=True, methods=["get"], pagination_class=ItemPagination)
    def items(self, request: Request, pk: str) -> Response:
        """Items of the batch in index order; filter with ?status=."""
        batch = self.get_object()
        item_status = _validated(ItemFilterSerializer, request.query_params).get("status")
        self.known_count = selectors.item_count(batch, status=item_status)
        items = selectors.batch_items(batch.pk, status=item_status).only(*ItemSerializer.Meta.fields)
        page = self.paginate_queryset(items)
        return cast(Response, self.get_paginated_response(ItemSerializer(page, many=True).data))

    @action(detail=True, methods=["get"])
    def callbacks(self, request: Request, pk: str) -> Response:
        """Completion webhook deliveries of the batch (at most one): status, attempts, last status code and error."""
        batch = self.get_object()
        page = self.paginate_queryset(selectors.batch_callbacks(batch.pk))
        return cast(Response, self.get_paginated_response(CallbackSerializer(page, many=True).data))
