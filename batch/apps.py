from __future__ import annotations

from django.apps import AppConfig


class BatchConfig(AppConfig):
    name = "batch"
    verbose_name = "Batches"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from batch.handlers import autodiscover

        autodiscover()
        import batch.consumers
        import batch.events  # noqa: F401  (connects the batch_changed receiver)
