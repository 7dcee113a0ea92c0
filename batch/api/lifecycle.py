"""Lifecycle actions of the batch API: pause (with a bounded wait), resume and retry.

A mixin of `views.BatchViewSet` (`/api/batches/{id}/pause/`, `…/resume/`, `…/retry/`). Visibility comes
first (404), then the permission (403, `batch.pause_batchjob` for others' batches), then the
state (409). The pause waits like a cancel: async, holding no database connection between
reads (`drain.wait_until`).
"""

from __future__ import annotations

import uuid
from typing import Any

from adrf.viewsets import GenericViewSet
from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from batch import selectors, services
from batch.api import concurrency, drain
from batch.api.exceptions import Conflict, DrainTimeout
from batch.api.serializers import BatchRetrySerializer, BatchSerializer, DrainSerializer
from batch.models import BatchJob, BatchStatus

IDEMPOTENCY_HEADER = "Idempotency-Key"


class LifecycleActions(GenericViewSet):
    """`pause`, `resume` and `retry` for `BatchViewSet` (which provides the queryset and permissions)."""

    @extend_schema(  # type: ignore[type-var]
        parameters=[DrainSerializer],
        request=None,
        responses={200: BatchSerializer},
        description="Pause: start no more items; wait up to drain_timeout seconds for the running ones to finish. "
        "200 paused and nothing runs, 409 finished, cancelling or already paused, 504 items still running "
        "(the batch stays paused; they finish on their own).",
    )
    @action(detail=True, methods=["post"])
    async def pause(self, request: Request, pk: str) -> Response:
        params = drain_params(request)
        timeout = params.get("drain_timeout", settings.BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS)
        limit = settings.BATCH_MAX_WAITING_CANCELS_PER_USER
        with concurrency.pause_waits.hold(request.user, limit=limit, retry_after=timeout):
            return await self._pause_and_wait(wait_seconds=timeout)

    async def _pause_and_wait(self, *, wait_seconds: float) -> Response:
        batch = await drain.released(self.get_object)()  # visibility and permission before state
        result = await drain.released(services.pause_batch)(batch_id=batch.pk, by=self.request.user)
        _raise_unless_applied(result, "paused")
        waited = await drain.wait_until(
            batch.pk, fetch=lambda: self._settled(batch.pk), done=_pause_done, seconds=wait_seconds
        )
        if waited is None:
            raise exceptions.NotFound()
        fresh, settled = waited
        data = await drain.released(self._render_batch)(fresh)
        if fresh.status == BatchStatus.PAUSED and not settled:
            raise DrainTimeout(
                f"{fresh.running_items} item(s) still running after {wait_seconds:g}s; the batch stays paused "
                "and they finish on their own.",
                extra={"batch": data, "running_items": fresh.running_items},
            )
        return Response(data)

    @extend_schema(request=None, responses={200: BatchSerializer}, description="Resume a paused batch.")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        batch = self.get_object()
        result = services.resume_batch(batch_id=batch.pk, by=request.user)
        _raise_unless_applied(result, "paused", refused="The batch is not paused ({status}).")
        assert result.batch is not None
        return Response(self._render_batch(result.batch))

    @extend_schema(
        request=BatchRetrySerializer,
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
        responses={
            201: BatchSerializer,
            200: OpenApiResponse(BatchSerializer, description="Replay of an Idempotency-Key: the first retry."),
        },
        description="Run the failed (or also the cancelled) items of a finished batch again, as a new batch "
        "with retry_of; 409 if the batch has not finished or has no such items.",
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str) -> Response:
        include = _validated(BatchRetrySerializer, request.data)["include"]
        key = request.headers.get(IDEMPOTENCY_HEADER) or None
        if key is not None and (len(key) > 255 or not key.isprintable()):
            raise exceptions.ValidationError({IDEMPOTENCY_HEADER: ["At most 255 printable characters."]})
        original = self.get_object()
        result = services.retry_batch(batch_id=original.pk, include=include, by=request.user, idempotency_key=key)
        if result.outcome is services.RetryOutcome.NOT_FOUND:
            raise exceptions.NotFound()
        if result.outcome in _RETRY_CONFLICTS:
            raise Conflict(_RETRY_CONFLICTS[result.outcome].format(status=original.status))
        assert result.batch is not None
        data = self._render_batch(result.batch)
        code = status.HTTP_201_CREATED if result.outcome is services.RetryOutcome.CREATED else status.HTTP_200_OK
        return Response(data, status=code, headers={"Location": data["url"]})

    def _settled(self, batch_id: uuid.UUID) -> tuple[BatchJob, bool] | None:
        batch = self.get_queryset().filter(pk=batch_id).first()
        return None if batch is None else (batch, selectors.pause_settled(batch))

    def _render_batch(self, batch: BatchJob) -> dict[str, Any]:
        return dict(BatchSerializer(batch, context=self.get_serializer_context()).data)


_RETRY_CONFLICTS = {
    services.RetryOutcome.NOT_FINISHED: "Only a finished batch can be retried ({status}).",
    services.RetryOutcome.NOTHING_TO_RETRY: "The batch has no items of the statuses asked for.",
    services.RetryOutcome.KEY_IN_USE: "This Idempotency-Key was used for another batch.",
}


def _validated(serializer_class: type[serializers.Serializer[Any]], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def drain_params(request: Request) -> dict[str, Any]:
    return _validated(DrainSerializer, request.query_params)


def _pause_done(value: tuple[BatchJob, bool]) -> bool:
    batch, settled = value
    return settled or batch.status != BatchStatus.PAUSED  # resumed, cancelled or finished meanwhile


def _raise_unless_applied(result: services.TransitionResult, verb: str, *, refused: str = "") -> None:
    if result.outcome is services.Transition.NOT_FOUND:
        raise exceptions.NotFound()
    if result.outcome is services.Transition.REFUSED:
        status = result.batch.status if result.batch is not None else "gone"
        raise Conflict((refused or "The batch cannot be {verb} now ({status}).").format(verb=verb, status=status))
