"""The dashboard pages (batch/dashboard.py): what they offer to whom, and their result links.

The controls themselves run in the browser (tests/browser/test_dashboard.py); here the page's
config decides which buttons actions.js may show, and the templates carry the dialogs.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from batch.models import BatchJob
from tests.conftest import grant

pytestmark = pytest.mark.django_db


def staff_client(make_user: Any, name: str, *codenames: str) -> Client:
    who = make_user(name, is_staff=True)
    grant(who, "view_batchjob", *codenames)
    client = Client()
    client.force_login(who)
    return client


@pytest.fixture
def batch(submit: Any, user: Any) -> BatchJob:
    return submit("demo.sleep", [{"seconds": 1}] * 2, created_by=user, name="nightly")


def test_pause_and_retry_are_offered_on_others_batches_only_with_their_permissions(
    make_user: Any, batch: BatchJob
) -> None:
    watcher = staff_client(make_user, "wanda")
    operator = staff_client(make_user, "otto", "pause_batchjob", "retry_batchjob")
    for client, allowed in ((watcher, False), (operator, True)):
        for url in ("/admin/batch/dashboard/", f"/admin/batch/dashboard/{batch.pk}/"):
            permissions = client.get(url).context["config"]["permissions"]
            assert (permissions["pause"], permissions["retry"]) == (allowed, allowed), url


def test_batch_page_links_the_results_as_jsonl_and_csv(make_user: Any, batch: BatchJob) -> None:
    page = staff_client(make_user, "wanda").get(f"/admin/batch/dashboard/{batch.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'href="/api/batches/{batch.pk}/export/?as=jsonl"' in html
    assert f'href="/api/batches/{batch.pk}/export/?as=csv"' in html


def test_pages_carry_the_pause_and_retry_dialogs_and_their_script(make_user: Any, batch: BatchJob) -> None:
    client = staff_client(make_user, "wanda")
    for url in ("/admin/batch/dashboard/", f"/admin/batch/dashboard/{batch.pk}/"):
        html = client.get(url).content.decode()
        for marker in ("data-cancel-dialog", "data-pause-dialog", "data-retry-dialog", "batch/actions.js"):
            assert marker in html, (url, marker)
