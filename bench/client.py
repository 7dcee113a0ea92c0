"""How the scenarios submit and cancel: through the REST API when it exists, else services."""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from batch import services
from batch.models import BatchJob, BatchStatus


class Client(Protocol):
    via: str

    def submit(self, handler: str, items: list[dict[str, Any]], max_parallel: int) -> uuid.UUID: ...

    def cancel(self, batch_id: uuid.UUID) -> str:
        """Request the cancel and return once the batch is `cancelled`; the final status."""
        ...


class ServiceClient:
    """`services.submit_batch`, and `services.request_cancel` + waiting for `cancelled`."""

    via = "services"

    def submit(self, handler: str, items: list[dict[str, Any]], max_parallel: int) -> uuid.UUID:
        return services.submit_batch(handler=handler, items=items, max_parallel=max_parallel).batch.id

    def cancel(self, batch_id: uuid.UUID, timeout: float = 30.0) -> str:
        result = services.request_cancel(batch_id=batch_id)
        deadline = time.monotonic() + timeout
        status = result.batch.status if result.batch else "missing"
        while status == BatchStatus.CANCELLING and time.monotonic() < deadline:
            time.sleep(0.002)
            status = BatchJob.objects.values_list("status", flat=True).get(pk=batch_id)
        return str(status)


def make_client() -> Client:
    return ServiceClient()
