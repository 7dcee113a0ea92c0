"""Submitting a batch: validate every item, then write the batch and all its items in one transaction."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from rest_framework import serializers

from batch import limits
from batch.handlers import HandlerSpec, UnknownHandler, get_handler, registered_handlers
from batch.models import (
    AuditAction,
    BatchJob,
    BatchJobItem,
)
from batch.services._base import (
    MAX_PARALLEL_LIMIT,
    Actor,
    SubmitError,
    SubmitResult,
    as_user,
    audit,
    notify,
)
from batch.services.callbacks import callback_url_problem

logger = logging.getLogger(__name__)


SUBMIT_CHUNK_SIZE = 10_000  # items per write (one COPY on PostgreSQL); Django splits bulk_create further


MAX_REPORTED_ITEM_ERRORS = 100


def _validate_items(spec: HandlerSpec, items: object) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise SubmitError({"items": ["Expected a list of item parameter objects."]})
    if not items:
        raise SubmitError({"items": ["A batch needs at least one item."]})
    limit = settings.BATCH_MAX_ITEMS_PER_BATCH
    if len(items) > limit:
        raise SubmitError(
            {"items": [f"A batch may hold at most {limit} items; got {len(items)}."]},
            too_many_items=True,
        )
    validated: list[dict[str, Any]] = []
    errors: dict[str, Any] = {}
    for index, params in enumerate(items):
        try:
            validated.append(_validate_item(spec, params))
        except serializers.ValidationError as exc:
            if len(errors) < MAX_REPORTED_ITEM_ERRORS:
                errors[str(index)] = exc.detail
    if errors:
        raise SubmitError({"items": errors})
    return validated


def _validate_item(spec: HandlerSpec, params: object) -> dict[str, Any]:
    """The handler's validation, after the shared limits (NUL, nesting depth, size)."""
    problem = limits.params_problem(params)
    if problem is not None:
        raise serializers.ValidationError([problem])
    return spec.validate(params)


def _validate_submission(handler: str, items: object, max_parallel: int, name: str) -> list[dict[str, Any]]:
    if (problem := limits.text_problem(handler, max_length=limits.MAX_NAME_LENGTH)) is not None:
        raise SubmitError({"handler": [problem]})
    try:
        spec = get_handler(handler)
    except UnknownHandler:
        known = ", ".join(registered_handlers())
        raise SubmitError({"handler": [f"Unknown handler {handler!r}. Known handlers: {known}."]}) from None
    if not 1 <= max_parallel <= MAX_PARALLEL_LIMIT:
        raise SubmitError({"max_parallel": [f"Must be between 1 and {MAX_PARALLEL_LIMIT}."]})
    if (problem := limits.text_problem(name, max_length=limits.MAX_NAME_LENGTH)) is not None:
        raise SubmitError({"name": [problem]})
    return _validate_items(spec, items)


MAX_ATTEMPTS_LIMIT = 100
MAX_DEADLINE_SECONDS = 366 * 24 * 3600
MAX_FAILURES_LIMIT = 2**31 - 1  # the column's range on every database (PositiveIntegerField)


def _validate_stop_rules(*, max_attempts: int | None, max_failures: int | None, deadline_seconds: int | None) -> None:
    bounds = {
        "max_attempts": (max_attempts, MAX_ATTEMPTS_LIMIT),
        "max_failures": (max_failures, MAX_FAILURES_LIMIT),
        "deadline_seconds": (deadline_seconds, MAX_DEADLINE_SECONDS),
    }
    errors = {
        name: [f"Must be at least 1{f' and at most {top}' if top else ''}, or null."]
        for name, (value, top) in bounds.items()
        if value is not None and (isinstance(value, bool) or value < 1 or (top is not None and value > top))
    }
    if errors:
        raise SubmitError(errors)


def _validate_callback_url(callback_url: object) -> None:
    if not isinstance(callback_url, str):
        raise SubmitError({"callback_url": ["Must be a string."]})
    if callback_url and (problem := callback_url_problem(callback_url)) is not None:
        raise SubmitError({"callback_url": [problem]})


def submit_batch(
    *,
    handler: str,
    items: object,
    max_parallel: int | None = None,
    name: str = "",
    created_by: Actor = None,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
    max_failures: int | None = None,
    deadline_seconds: int | None = None,
    callback_url: str = "",
) -> SubmitResult:
    """Validate every item, then write the batch and all its items in one transaction.

    Raises SubmitError (nothing written). With `idempotency_key`, a repeat by the same user
    returns the batch first created with that key, also under concurrent identical requests.
    """
    owner = as_user(created_by)
    if idempotency_key is not None:
        if (problem := limits.text_problem(idempotency_key, max_length=limits.MAX_IDEMPOTENCY_KEY_LENGTH)) is not None:
            raise SubmitError({"idempotency_key": [problem]})
        existing = BatchJob.objects.filter(created_by=owner, idempotency_key=idempotency_key).first()
        if existing is not None:
            return SubmitResult(batch=existing, created=False)
    max_parallel = settings.BATCH_GLOBAL_MAX_PARALLEL if max_parallel is None else max_parallel
    _validate_stop_rules(max_attempts=max_attempts, max_failures=max_failures, deadline_seconds=deadline_seconds)
    _validate_callback_url(callback_url)
    validated = _validate_submission(handler, items, max_parallel, name)
    try:
        batch = _insert_batch(
            handler=handler,
            params=validated,
            max_parallel=max_parallel,
            name=name,
            owner=owner,
            idempotency_key=idempotency_key,
            stop_rules={
                "max_attempts": max_attempts or default_attempts(get_handler(handler)),
                "max_failures": max_failures,
                "deadline_seconds": deadline_seconds,
            },
            callback_url=callback_url,
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = BatchJob.objects.filter(created_by=owner, idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return SubmitResult(batch=existing, created=False)
    return SubmitResult(batch=batch, created=True)


def default_attempts(spec: HandlerSpec) -> int:
    """Attempts per item of a batch that names none: its handler's `Retry`, else BATCH_MAX_ATTEMPTS.
    They bound every attempt, retries after a failure and recoveries after a lost lease alike."""
    return spec.retry.attempts if spec.retry is not None else settings.BATCH_MAX_ATTEMPTS


def _insert_batch(
    *,
    handler: str,
    params: list[dict[str, Any]],
    max_parallel: int,
    name: str,
    owner: User | None,
    idempotency_key: str | None,
    stop_rules: dict[str, int | None],
    callback_url: str,
) -> BatchJob:
    with transaction.atomic():
        batch = BatchJob.objects.create(
            handler=handler,
            name=name,
            max_parallel=max_parallel,
            total_items=len(params),
            created_by=owner,
            idempotency_key=idempotency_key,
            callback_url=callback_url,
            **stop_rules,
        )
        _insert_items(batch.id, params)
        audit(batch.id, AuditAction.SUBMITTED, owner, batch.created_at, items=len(params), max_parallel=max_parallel)
        notify(batch.id, "submitted")
    logger.info(
        "batch submitted",
        extra={"batch_id": str(batch.id), "handler": handler, "total": len(params)},
    )
    return batch


def _insert_items(batch_id: uuid.UUID, params: list[dict[str, Any]]) -> None:
    """All items of a new batch, SUBMIT_CHUNK_SIZE per write, in the caller's transaction."""
    for start in range(0, len(params), SUBMIT_CHUNK_SIZE):
        _write_item_chunk(batch_id, start, params[start : start + SUBMIT_CHUNK_SIZE])


def _write_item_chunk(batch_id: uuid.UUID, start: int, chunk: list[dict[str, Any]]) -> None:
    """Items `start`, `start + 1`, … : COPY on PostgreSQL (the ORM's bulk_create spent most of
    a 100,000-item submit building model instances and quoting values), bulk_create elsewhere."""
    if connection.vendor != "postgresql":
        rows = [BatchJobItem(batch_id=batch_id, index=start + offset, params=item) for offset, item in enumerate(chunk)]
        BatchJobItem.objects.bulk_create(rows)
        return
    # Every column but the key, with the model's defaults: a column added later is filled too.
    template = BatchJobItem(batch_id=batch_id, index=0, params={})
    fields = [f for f in BatchJobItem._meta.concrete_fields if not f.primary_key]
    row = [f.get_db_prep_save(f.pre_save(template, add=True), connection) for f in fields]
    at = {f.attname: position for position, f in enumerate(fields)}
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    params_field = BatchJobItem._meta.get_field("params")
    with (
        connection.wrap_database_errors,
        connection.connection.cursor() as cursor,
        cursor.copy(f"COPY batch_job_item ({columns}) FROM STDIN") as copy,
    ):
        for offset, item in enumerate(chunk):
            row[at["index"]] = start + offset
            row[at["params"]] = params_field.get_db_prep_save(item, connection)
            copy.write_row(row)
