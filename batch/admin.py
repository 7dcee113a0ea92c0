"""Admin for batches and their items: read-only rows; changes only through the services.

Cancel, resize, pause, resume and retry are admin actions guarded by the model's
`cancel_batchjob`, `resize_batchjob`, `pause_batchjob` and `retry_batchjob` permissions.
Cancelling and pausing do not wait for the running items (the API does). "Download results"
streams one batch's CSV (`batch.export`); its page links to both export formats of the API.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from rest_framework.exceptions import Throttled

from batch import services
from batch.api.export import streamed_export
from batch.audit import AuditTrailMixin
from batch.models import BatchCallback, BatchJob, BatchJobItem

_SEGMENTS = ("succeeded", "failed", "cancelled", "running", "pending")


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Rows are written by the services only; deleting is for superusers."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)


class ResizeForm(forms.Form):
    max_parallel = forms.IntegerField(min_value=1, max_value=services.MAX_PARALLEL_LIMIT)


def progress_bar(batch: BatchJob) -> SafeString:
    """Stacked segments (plain HTML/CSS; colours from batch/admin CSS, readable in dark mode)."""
    total = batch.total_items or 1
    counts = {name: getattr(batch, f"{name}_items") for name in _SEGMENTS}
    segments = format_html_join(
        "",
        '<span class="batch-seg batch-seg-{}" style="width:{}%" title="{} {}"></span>',
        ((name, f"{100 * n / total:.2f}", n, name) for name, n in counts.items() if n),
    )
    return format_html('<span class="batch-progress" role="img" aria-label="{}">{}</span>', _summary(batch), segments)


def _summary(batch: BatchJob) -> str:
    return (
        f"{batch.finished_items}/{batch.total_items} done: {batch.succeeded_items} succeeded, "
        f"{batch.failed_items} failed, {batch.cancelled_items} cancelled, {batch.running_items} running"
    )


def _resize(batch_id: uuid.UUID, max_parallel: int) -> BatchJob | None:
    try:
        return services.resize_batch(batch_id=batch_id, max_parallel=max_parallel)
    except BatchJob.DoesNotExist:  # deleted meanwhile
        return None


CALLBACK_FIELDS = (
    "url",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "created_at",
    "next_attempt_at",
    "delivered_at",
)


class CallbackInline(admin.TabularInline):  # type: ignore[type-arg]
    """The batch's completion webhook delivery (read-only: workers write it)."""

    model = BatchCallback
    fields = CALLBACK_FIELDS
    readonly_fields = CALLBACK_FIELDS
    extra = 0
    can_delete = False
    verbose_name_plural = "completion webhook"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BatchCallback)
class BatchCallbackAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "batch_link", "status", "attempts", "last_status_code", "created_at", "delivered_at"]
    list_filter = ["status"]
    list_select_related = ["batch"]
    search_fields = ["url"]
    readonly_fields = ("batch_link", *CALLBACK_FIELDS, "lease_owner", "lease_expires_at", "body")
    fields = readonly_fields

    @admin.display(description="batch", ordering="batch")
    def batch_link(self, callback: BatchCallback) -> SafeString:
        url = reverse("admin:batch_batchjob_change", args=[callback.batch_id])
        return format_html('<a href="{}">{}</a>', url, callback.batch)


@admin.register(BatchJob)
class BatchJobAdmin(AuditTrailMixin, ReadOnlyAdmin):
    list_display = ["__str__", "status", "progress", "counts", "handler", "owner", "created_at", "duration"]
    list_filter = ["status", "handler"]
    search_fields = ["name", "handler"]
    list_select_related = ["created_by"]
    actions = [
        "cancel_batches",
        "resize_batches",
        "pause_batches",
        "resume_batches",
        "retry_batches",
        "download_results",
    ]
    readonly_fields = [
        "id",
        "name",
        "handler",
        "status",
        "progress",
        "max_parallel",
        "effective_parallel",
        "max_attempts",
        "max_failures",
        "deadline_seconds",
        "total_items",
        "pending_items",
        "running_items",
        "succeeded_items",
        "failed_items",
        "cancelled_items",
        "items_link",
        "export_links",
        "owner",
        "created_at",
        "started_at",
        "finished_at",
        "duration",
        "cancel_requested_at",
        "cancel_requested_by",
        "status_reason",
        "retry_of",
        "callback_url",
        "idempotency_key",
        "audit_trail",
    ]
    fields = tuple(readonly_fields)
    inlines = [CallbackInline]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[BatchJob], search_term: str
    ) -> tuple[QuerySet[BatchJob], bool]:
        """Name and handler contain the term, or the term is the batch's id."""
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        try:
            batch_id = uuid.UUID(search_term.strip())
        except ValueError:
            return results, may_have_duplicates
        return results | queryset.filter(pk=batch_id), may_have_duplicates

    @admin.display(description="progress")
    def progress(self, batch: BatchJob) -> SafeString:
        return progress_bar(batch)

    @admin.display(description="done / total")
    def counts(self, batch: BatchJob) -> str:
        extra = [f"{n} {name}" for name in ("failed", "cancelled", "running") if (n := getattr(batch, f"{name}_items"))]
        return f"{batch.finished_items} / {batch.total_items}" + (f" ({', '.join(extra)})" if extra else "")

    @admin.display(description="owner", ordering="created_by__username")
    def owner(self, batch: BatchJob) -> str:
        return batch.created_by.get_username() if batch.created_by else "—"

    @admin.display(description="duration")
    def duration(self, batch: BatchJob) -> str:
        if batch.started_at is None:
            return "—"
        seconds = int(((batch.finished_at or timezone.now()) - batch.started_at).total_seconds())
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    @admin.display(description="items")
    def items_link(self, batch: BatchJob) -> SafeString:
        url = reverse("admin:batch_batchjobitem_changelist") + f"?batch__id__exact={batch.pk}"
        return format_html('<a href="{}">{} items of this batch</a>', url, batch.total_items)

    @admin.display(description="results")
    def export_links(self, batch: BatchJob) -> SafeString:
        url = reverse("batch-export", args=[batch.pk])
        return format_html('Download <a href="{}?as=csv">CSV</a> · <a href="{}?as=jsonl">JSON Lines</a>', url, url)

    @admin.action(description="Download results (CSV)", permissions=["view"])
    def download_results(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> StreamingHttpResponse | None:
        batches = list(queryset[:2])
        if len(batches) != 1:
            self.message_user(request, "Select exactly one batch to download its results.", messages.WARNING)
            return None
        try:
            return streamed_export(request, batches[0], "csv")
        except Throttled as refused:
            self.message_user(request, str(refused.detail), messages.ERROR)
            return None

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("batch.cancel_batchjob"))

    def has_resize_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("batch.resize_batchjob"))

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("batch.pause_batchjob"))

    @admin.action(description="Pause selected batches", permissions=["pause"])
    def pause_batches(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        self._transition(request, queryset, services.pause_batch, done="Paused", refused="not pending or running")

    @admin.action(description="Resume selected batches", permissions=["pause"])
    def resume_batches(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        self._transition(request, queryset, services.resume_batch, done="Resumed", refused="not paused")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("batch.retry_batchjob"))

    @admin.action(description="Retry failed items of selected batches", permissions=["retry"])
    def retry_batches(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        ids = queryset.values_list("pk", flat=True)
        outcomes = Counter(services.retry_batch(batch_id=pk, by=request.user).outcome for pk in ids)
        self.message_user(request, f"Submitted {outcomes[services.RetryOutcome.CREATED]} retry batch(es).")
        skipped = sum(n for outcome, n in outcomes.items() if outcome is not services.RetryOutcome.CREATED)
        if skipped:
            self.message_user(request, f"{skipped} skipped (not finished, or no failed items).", messages.WARNING)

    def _transition(
        self,
        request: HttpRequest,
        queryset: QuerySet[BatchJob],
        service: Callable[..., services.TransitionResult],
        *,
        done: str,
        refused: str,
    ) -> None:
        ids = queryset.values_list("pk", flat=True)
        outcomes = Counter(service(batch_id=pk, by=request.user).outcome for pk in ids)
        self.message_user(request, f"{done} {outcomes[services.Transition.APPLIED]} batch(es).")
        skipped = outcomes[services.Transition.REFUSED] + outcomes[services.Transition.NOT_FOUND]
        if skipped:
            self.message_user(request, f"{skipped} skipped ({refused}).", messages.WARNING)

    @admin.action(description="Cancel selected batches", permissions=["cancel"])
    def cancel_batches(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> None:
        outcomes = Counter(
            services.request_cancel(batch_id=pk, by=request.user).outcome
            for pk in queryset.values_list("pk", flat=True)
        )
        cancelled = outcomes[services.CancelOutcome.REQUESTED]
        self.message_user(request, f"Cancelled {cancelled} batch(es); running items stop at their next checkpoint.")
        skipped = outcomes[services.CancelOutcome.TERMINAL] + outcomes[services.CancelOutcome.NOT_FOUND]
        already = outcomes[services.CancelOutcome.ALREADY_CANCELLING]
        if skipped or already:
            self.message_user(
                request,
                f"{skipped} already finished, {already} already cancelling.",
                messages.WARNING,
            )

    @admin.action(description="Change max_parallel of selected batches", permissions=["resize"])
    def resize_batches(self, request: HttpRequest, queryset: QuerySet[BatchJob]) -> HttpResponse | None:
        form = ResizeForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            value = form.cleaned_data["max_parallel"]
            resized = [
                services.resize_batch(batch_id=pk, max_parallel=value, by=request.user)
                for pk in queryset.values_list("pk", flat=True)
            ]
            done = sum(batch is not None for batch in resized)
            self.message_user(request, f"Set max_parallel={value} on {done} batch(es).")
            if len(resized) > done:
                self.message_user(request, f"{len(resized) - done} already finished, unchanged.", messages.WARNING)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Change max_parallel",
            "opts": self.model._meta,
            "form": form,
            "batches": queryset,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/batch/batchjob/resize.html", context)


@admin.register(BatchJobItem)
class BatchJobItemAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "batch_link", "index", "status", "attempts", "started_at", "finished_at", "short_error"]
    list_filter = ["status"]
    list_select_related = ["batch"]
    show_full_result_count = False  # no COUNT(*) over the whole (huge) table
    list_per_page = 100
    readonly_fields = [
        "batch_link",
        "index",
        "status",
        "params",
        "result",
        "error",
        "errors",
        "attempts",
        "available_at",
        "source_index",
        "lease_owner",
        "lease_expires_at",
        "started_at",
        "finished_at",
    ]
    fields = tuple(readonly_fields)

    @admin.display(description="batch", ordering="batch")
    def batch_link(self, item: BatchJobItem) -> SafeString:
        url = reverse("admin:batch_batchjob_change", args=[item.batch_id])
        return format_html('<a href="{}">{}</a>', url, item.batch)

    @admin.display(description="error")
    def short_error(self, item: BatchJobItem) -> str:
        return item.error[:80] + ("…" if len(item.error) > 80 else "")
