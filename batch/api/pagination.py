"""Page-number pagination: `{count, next, previous, results}` (the contract's shape).

Items of a 100,000-item batch are paged without `COUNT(*)`: the batch's counters already
hold how many items it has in each status, so the view passes that number as `known_count`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from django.core.paginator import Paginator
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.views import APIView


class BatchPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class _KnownCountPaginator(Paginator):  # type: ignore[type-arg]
    known_count: int | None = None

    @cached_property
    def count(self) -> int:
        if self.known_count is not None:
            return self.known_count
        return super().count


class ItemPagination(BatchPagination):
    """Takes the count from `view.known_count` (an int) when the view sets one."""

    page_size = 100
    max_page_size = 1000

    def paginate_queryset(self, queryset: Any, request: Request, view: APIView | None = None) -> Any:
        known = getattr(view, "known_count", None)

        class Paginator(_KnownCountPaginator):
            known_count = known

        self.django_paginator_class = Paginator
        return super().paginate_queryset(queryset, request, view)
