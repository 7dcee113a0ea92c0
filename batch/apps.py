from __future__ import annotations

from django.apps import AppConfig


class BatchConfig(AppConfig):
    name = "batch"
    verbose_name = "Batches"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from batch import checks, conf
        from batch.handlers import autodiscover

        conf.install_defaults()  # before anything below reads a BATCH_* setting
        checks.register()
        autodiscover()
        import batch.consumers
        import batch.events  # noqa: F401  (connects the batch_changed receiver)
