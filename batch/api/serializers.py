"""Serializers: the contract's batch and item fields, and the shapes of request bodies.

Submission bodies are only parsed here; `services.submit_batch` validates the handler and
every item (so the API, the admin and the commands refuse the same things).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ParseError

from batch.api.limits import RejectUnknownFields, decode_json
from batch.handlers import registered_handlers
from batch.limits import string_problem
from batch.models import BatchCallback, BatchJob, BatchJobItem, BatchStatus, ItemStatus
from batch.services import MAX_PARALLEL_LIMIT, MAX_REPORTED_ITEM_ERRORS
from batch.services.callbacks import MAX_CALLBACK_URL_LENGTH
from batch.services.submit import MAX_ATTEMPTS_LIMIT, MAX_DEADLINE_SECONDS, MAX_FAILURES_LIMIT

BATCH_FIELDS = [
    "id",
    "name",
    "handler",
    "status",
    "max_parallel",
    "effective_parallel",
    "total_items",
    "pending_items",
    "running_items",
    "succeeded_items",
    "failed_items",
    "cancelled_items",
    "created_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "status_reason",
    "max_attempts",
    "max_failures",
    "deadline_seconds",
    "retry_of",
    "callback_url",
    "owner",
    "url",
    "items_url",
]


class BatchSerializer(serializers.ModelSerializer[BatchJob]):
    url = serializers.HyperlinkedIdentityField(view_name="batch-detail")
    items_url = serializers.HyperlinkedIdentityField(view_name="batch-items")
    effective_parallel = serializers.IntegerField(read_only=True)
    pending_items = serializers.IntegerField(read_only=True)
    owner = serializers.CharField(source="created_by.username", read_only=True, allow_null=True, default=None)
    callback_url = serializers.CharField(read_only=True, help_text="POSTed once the batch ends; empty: none.")
    # A string, not a UUID object: the WebSocket's payloads and the webhook's body go through plain json.dumps.
    retry_of: serializers.PrimaryKeyRelatedField[BatchJob] = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True, pk_field=serializers.UUIDField()
    )

    class Meta:
        model = BatchJob
        fields = BATCH_FIELDS
        read_only_fields = BATCH_FIELDS


def _handler_help() -> str:
    return "Registered handler name, e.g. " + ", ".join(registered_handlers()) + "."


@extend_schema_field({"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": True}})
class ItemParamsField(serializers.JSONField):
    """A list of parameter objects, passed to the service as is: validating 100,000 items
    field by field here would double the work `services.submit_batch` does per item.
    Only strings that cannot be stored (NUL, lone surrogates) are refused here; a form's
    JSON text is decoded as strictly as a JSON body (`limits.decode_json`)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) and getattr(data, "is_json_string", False):
            try:
                data = decode_json(data)
            except ParseError as exc:
                raise serializers.ValidationError(str(exc.detail)) from None
        value = super().to_internal_value(data)
        if isinstance(value, list):
            bad = [(index, problem) for index, params in enumerate(value) if (problem := _string_problem(params))]
            if bad:
                raise serializers.ValidationError({str(i): [problem] for i, problem in bad[:MAX_REPORTED_ITEM_ERRORS]})
        return value


def _string_problem(value: object) -> str | None:
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str) and (problem := string_problem(current)) is not None:
            return problem
        if isinstance(current, dict):
            stack.extend(current.keys())
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return None


class BatchSubmitSerializer(RejectUnknownFields):
    handler = serializers.CharField(max_length=200)
    items = ItemParamsField(
        help_text='List of parameter objects, one per item, e.g. [{"seconds": 1}]. '
        "Item errors are reported under errors.items.<index>.",
    )
    max_parallel = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_PARALLEL_LIMIT, help_text="Defaults to the global cap."
    )
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    max_attempts = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ATTEMPTS_LIMIT,
        help_text="Attempts per item (default BATCH_MAX_ATTEMPTS).",
    )
    max_failures = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_FAILURES_LIMIT,
        help_text="Stop the batch (it ends failed, status_reason 'failure threshold') once this many items failed.",
    )
    deadline_seconds = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_DEADLINE_SECONDS,
        help_text="Cancel the batch this many seconds after it started (status_reason 'deadline').",
    )
    # A CharField: the service judges the URL (scheme, user info, allowed hosts) for every edge.
    callback_url = serializers.CharField(
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        max_length=MAX_CALLBACK_URL_LENGTH,
        default="",
        help_text="POSTed the batch's JSON, signed (X-Batch-Signature), once it ends; its host must be in "
        "BATCH_CALLBACK_ALLOWED_HOSTS.",
    )

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        fields = super().get_fields()
        # Built per instance: handlers register at app loading, after this module is imported.
        fields["handler"] = serializers.ChoiceField(choices=list(registered_handlers()), help_text=_handler_help())
        return fields


class BatchResizeSerializer(RejectUnknownFields):
    max_parallel = serializers.IntegerField(min_value=1, max_value=MAX_PARALLEL_LIMIT)


class BatchRetrySerializer(RejectUnknownFields):
    include = serializers.ListField(
        child=serializers.ChoiceField(choices=["failed", "cancelled"]),
        allow_empty=False,
        max_length=2,
        default=["failed"],
        help_text='The statuses of the items to run again: ["failed"] (default) or ["failed", "cancelled"].',
    )


class BatchFilterSerializer(serializers.Serializer[dict[str, Any]]):
    status = serializers.ChoiceField(choices=BatchStatus.choices, required=False)
    handler = serializers.CharField(max_length=200, required=False)


class ItemFilterSerializer(serializers.Serializer[dict[str, Any]]):
    status = serializers.ChoiceField(choices=ItemStatus.choices, required=False)


class DrainSerializer(serializers.Serializer[dict[str, Any]]):
    drain_timeout = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=300,
        help_text="Seconds to wait for the running items to stop (0..300); default BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS.",
    )


class ItemSerializer(serializers.ModelSerializer[BatchJobItem]):
    class Meta:
        model = BatchJobItem
        fields = [
            "id",
            "index",
            "source_index",
            "status",
            "params",
            "result",
            "error",
            "errors",
            "attempts",
            "available_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class CallbackSerializer(serializers.ModelSerializer[BatchCallback]):
    """One completion webhook delivery of a batch (the outbox row)."""

    class Meta:
        model = BatchCallback
        fields = [
            "id",
            "url",
            "status",
            "attempts",
            "last_status_code",
            "last_error",
            "created_at",
            "next_attempt_at",
            "delivered_at",
        ]
        read_only_fields = fields


class ProblemSerializer(serializers.Serializer[dict[str, Any]]):
    """RFC 7807 problem details (documentation only; fields built in get_fields as
    `type`, `instance` and `errors` would shadow serializer attributes)."""

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {
            "type": serializers.CharField(),
            "title": serializers.CharField(),
            "status": serializers.IntegerField(),
            "detail": serializers.CharField(),
            "instance": serializers.CharField(),
            "errors": serializers.JSONField(required=False, help_text="Field errors; item errors keyed by item index."),
        }


class DrainTimeoutProblemSerializer(ProblemSerializer):
    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        return {**super().get_fields(), "batch": BatchSerializer(), "running_items": serializers.IntegerField()}
