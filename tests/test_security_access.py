"""Permissions end to end (API, admin, dashboard, WebSocket), the audit trail, production settings."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, Permission
from django.test import Client

from batch import services
from batch.models import BatchJob
from tests.conftest import ROOT, grant
from tests.test_consumers import communicator, session_cookie

pytestmark = pytest.mark.usefixtures("no_throttle")

TIMEOUT = 10


@pytest.fixture
def operator(make_user: Any) -> Any:
    """A staff member of an "operators" group: may watch every batch, not cancel or resize them."""
    group = Group.objects.create(name="operators")
    group.permissions.add(Permission.objects.get(codename="view_batchjob", content_type__app_label="batch"))
    who = make_user("olga", is_staff=True)
    who.groups.add(group)
    return who


@pytest.fixture
def alice_batch(user: Any, submit: Any) -> BatchJob:
    return submit("demo.sleep", [{"seconds": 1}] * 3, created_by=user, name="alice-nightly")


def admin_client(who: Any) -> Client:
    client = Client()
    client.force_login(who)
    return client


@pytest.mark.django_db
def test_operator_group_watches_but_cannot_cancel_or_resize_through_the_api(
    client_for: Any, operator: Any, alice_batch: BatchJob
) -> None:
    api = client_for(operator)
    assert api.get("/api/batches/").json()["count"] == 1
    assert api.get(f"/api/batches/{alice_batch.pk}/items/").status_code == 200
    for response in (
        api.delete(f"/api/batches/{alice_batch.pk}/"),
        api.post(f"/api/batches/{alice_batch.pk}/cancel/"),
        api.patch(f"/api/batches/{alice_batch.pk}/", {"max_parallel": 1}, format="json"),
    ):
        assert response.status_code == 403, response.content
        assert response["Content-Type"] == "application/problem+json"
    alice_batch.refresh_from_db()
    assert (alice_batch.status, alice_batch.max_parallel) == ("pending", 4)


@pytest.mark.django_db
def test_operator_admin_and_dashboard_offer_no_cancel_or_resize(operator: Any, alice_batch: BatchJob) -> None:
    client = admin_client(operator)
    changelist = client.get("/admin/batch/batchjob/")
    assert changelist.status_code == 200
    assert "alice-nightly" in changelist.text
    assert "cancel_batches" not in changelist.text and "resize_batches" not in changelist.text
    refused = client.post(
        "/admin/batch/batchjob/", {"action": "cancel_batches", "_selected_action": [alice_batch.pk]}, follow=True
    )
    # An action the operator lacks is unknown to Django: back to the changelist (redirected, now
    # that viewers have an action of their own, "Download results"), nothing done.
    assert refused.status_code == 200 and "No action selected." in refused.text
    page = client.get(f"/admin/batch/dashboard/{alice_batch.pk}/")
    assert page.status_code == 200
    assert page.context["config"]["permissions"] == {
        "submit": True,
        "cancel": False,
        "resize": False,
        "pause": False,
        "retry": False,
    }
    alice_batch.refresh_from_db()
    assert alice_batch.status == "pending"


@pytest.mark.django_db
def test_manager_group_can_cancel_and_resize_others_batches(
    client_for: Any, make_user: Any, alice_batch: BatchJob
) -> None:
    manager = make_user("mona", is_staff=True)
    grant(manager, "view_batchjob", "cancel_batchjob", "resize_batchjob")
    api = client_for(manager)
    assert api.patch(f"/api/batches/{alice_batch.pk}/", {"max_parallel": 2}, format="json").status_code == 200
    assert api.delete(f"/api/batches/{alice_batch.pk}/").json()["status"] == "cancelled"
    page = admin_client(manager).get("/admin/batch/dashboard/")
    assert page.context["config"]["permissions"] == {
        "submit": True,
        "cancel": True,
        "resize": True,
        "pause": False,
        "retry": False,
    }


@pytest.mark.django_db
def test_staff_without_permissions_see_only_their_own(client_for: Any, make_user: Any, alice_batch: BatchJob) -> None:
    staff = make_user("sam", is_staff=True)
    api = client_for(staff)
    assert api.get("/api/batches/").json()["count"] == 0
    assert api.delete(f"/api/batches/{alice_batch.pk}/").status_code == 404  # no existence leak
    assert admin_client(staff).get("/admin/batch/dashboard/").status_code == 403


@pytest.mark.django_db
def test_submit_permission_is_required_when_configured(client_for: Any, user: Any, settings: Any) -> None:
    settings.BATCH_SUBMIT_REQUIRES_PERMISSION = True
    body = {"handler": "demo.noop", "items": [{}]}
    assert client_for(user).post("/api/batches/", body, format="json").status_code == 403
    grant(user, "add_batchjob")
    assert client_for(user).post("/api/batches/", body, format="json").status_code == 201


@pytest.mark.django_db(transaction=True)
async def test_operator_watches_on_the_websocket_and_unprivileged_staff_are_refused(
    operator: Any, make_user: Any, alice_batch: BatchJob
) -> None:
    socket = communicator("/ws/batches/", cookie=await sync_to_async(session_cookie)(operator))
    accepted, _ = await asyncio.wait_for(socket.connect(), TIMEOUT)
    assert accepted
    snapshot = await asyncio.wait_for(socket.receive_json_from(), TIMEOUT)
    assert [b["id"] for b in snapshot["batches"]] == [str(alice_batch.pk)]
    await socket.disconnect()
    staff = await sync_to_async(make_user)("sam", is_staff=True)
    refused = communicator("/ws/batches/", cookie=await sync_to_async(session_cookie)(staff))
    accepted, code = await asyncio.wait_for(refused.connect(), TIMEOUT)
    assert (accepted, code) == (False, 4403)


# --- audit trail ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_audit_trail_records_submit_resize_cancel_with_actor(
    client_for: Any, user: Any, make_user: Any, submit: Any
) -> None:
    api = client_for(user)
    created = api.post("/api/batches/", {"handler": "demo.sleep", "items": [{"seconds": 1}] * 2}, format="json")
    batch_id = created.json()["id"]
    api.patch(f"/api/batches/{batch_id}/", {"max_parallel": 2}, format="json")
    api.delete(f"/api/batches/{batch_id}/")
    events = api.get(f"/api/batches/{batch_id}/events/").json()["results"]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("submitted", "alice"),
        ("resized", "alice"),
        ("cancel_requested", "alice"),
    ]
    assert events[0]["details"] == {"items": 2, "max_parallel": 4}
    assert events[1]["details"] == {"old": 4, "new": 2}
    assert client_for(make_user("bob")).get(f"/api/batches/{batch_id}/events/").status_code == 404
    assert client_for(None).get(f"/api/batches/{batch_id}/events/").status_code == 401


@pytest.mark.django_db
def test_audit_trail_is_on_the_admin_batch_page(make_user: Any, user: Any, submit: Any) -> None:
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    services.resize_batch(batch_id=batch.pk, max_parallel=3, by=user)
    services.request_cancel(batch_id=batch.pk)  # system (a command): no actor
    root = make_user("root", is_staff=True, is_superuser=True)
    page = admin_client(root).get(f"/admin/batch/batchjob/{batch.pk}/change/").text
    assert "audit trail" in page.lower()
    assert page.count("<tr><td>") == 3
    assert "Cancel requested</td><td>system" in page


@pytest.mark.django_db
def test_refused_changes_write_no_audit_event(user: Any, submit: Any) -> None:
    batch = submit("demo.sleep", [{"seconds": 0}], created_by=user)
    services.request_cancel(batch_id=batch.pk, by=user)
    assert services.resize_batch(batch_id=batch.pk, max_parallel=2, by=user) is None  # terminal
    assert services.request_cancel(batch_id=batch.pk, by=user).outcome is services.CancelOutcome.TERMINAL
    assert list(batch.audit_events.values_list("action", flat=True)) == ["submitted", "cancel_requested"]


# --- throttling and production settings -------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_is_throttled_per_user(api_client: Any, user: Any, submit: Any, settings: Any) -> None:
    settings.BATCH_CANCEL_THROTTLE_RATE = "2/min"
    batches = [submit("demo.sleep", [{"seconds": 1}], created_by=user) for _ in range(3)]
    codes = [api_client.delete(f"/api/batches/{b.pk}/").status_code for b in batches]
    assert codes == [200, 200, 429]
    assert BatchJob.objects.get(pk=batches[2].pk).status == "pending"


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_production_settings_pass_check_deploy_at_warning_level() -> None:
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING", DJANGO_DEBUG="0", DJANGO_SECRET_KEY=secrets.token_urlsafe(50)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.slow
def test_production_refuses_to_start_with_the_development_key() -> None:
    result = manage("check", DJANGO_DEBUG="0")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG=0" in result.stderr


@pytest.mark.slow
def test_production_settings_values() -> None:
    code = (
        "from django.conf import settings as s; import json; print(json.dumps([s.SECURE_SSL_REDIRECT,"
        " s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.CSRF_TRUSTED_ORIGINS,"
        " s.SECURE_PROXY_SSL_HEADER]))"
    )
    env = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://batch.example.com",
        "DJANGO_SECURE_PROXY_SSL_HEADER": "1",
    }
    result = manage("shell", "-v", "0", "-c", code, **env)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        True,
        True,
        True,
        31_536_000,
        ["https://batch.example.com"],
        ["HTTP_X_FORWARDED_PROTO", "https"],
    ]
