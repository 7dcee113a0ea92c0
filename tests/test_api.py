"""The REST contract (shared/CONTRACT.md), row by row, without a worker process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.test import RequestFactory

from batch import services
from batch.api.exceptions import server_error
from batch.models import BatchJob, BatchStatus
from batch.notify import control_watcher
from tests.conftest import grant
from tests.problems import assert_problem

pytestmark = pytest.mark.django_db

BATCH_FIELDS = {
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
    "url",
    "items_url",
}
ITEM_FIELDS = {
    "id",
    "index",
    "source_index",
    "errors",
    "available_at",
    "status",
    "params",
    "result",
    "error",
    "attempts",
    "started_at",
    "finished_at",
}


@pytest.fixture(autouse=True, scope="module")
def _stop_control_watcher() -> Iterator[None]:
    """Its LISTEN connection would keep the PostgreSQL test database from being dropped."""
    yield
    control_watcher.stop()


@pytest.fixture(autouse=True)
def _fresh_throttle() -> Iterator[None]:
    cache.clear()  # the submit throttle counts in the default cache
    yield
    cache.clear()


def sleep_items(n: int, **params: Any) -> list[dict[str, Any]]:
    return [{"seconds": 0, **params} for _ in range(n)]


@pytest.fixture
def batch_of(submit: Callable[..., BatchJob]) -> Callable[..., BatchJob]:
    def _batch(owner: Any, n: int = 3, **kwargs: Any) -> BatchJob:
        return submit("demo.sleep", sleep_items(n), created_by=owner, **kwargs)

    return _batch


def finish(batch: BatchJob) -> None:
    """Run every item of `batch` to success through the services (a worker in miniature)."""
    claimed = services.claim_items(batch_id=batch.pk, worker_id="w", limit=1000, lease_seconds=30)
    outcomes = [services.Outcome(item_id=item.id, status="succeeded") for item in claimed]
    services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=outcomes)


# --- POST /api/batches/ ------------------------------------------------------------------------


def test_submit_creates_batch_with_location_and_contract_fields(api_client: Any) -> None:
    body = {"handler": "demo.sleep", "items": sleep_items(3), "max_parallel": 2, "name": "nightly"}
    response = api_client.post("/api/batches/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data.keys() >= BATCH_FIELDS
    assert response["Location"] == data["url"]
    assert (data["status"], data["total_items"], data["pending_items"]) == ("pending", 3, 3)
    assert (data["max_parallel"], data["effective_parallel"], data["name"]) == (2, 2, "nightly")
    assert data["items_url"].endswith(f"/api/batches/{data['id']}/items/")


def test_submit_with_unknown_handler_is_a_validation_problem(api_client: Any) -> None:
    response = api_client.post("/api/batches/", {"handler": "nope", "items": [{}]}, format="json")
    body = assert_problem(response, 400)
    assert "handler" in body["errors"]


def test_submit_reports_invalid_item_params_by_item_index(api_client: Any) -> None:
    items = [{"seconds": 1}, {"seconds": 1}, {"seconds": 1}, {"seconds": -5}]
    response = api_client.post("/api/batches/", {"handler": "demo.sleep", "items": items}, format="json")
    body = assert_problem(response, 400)
    assert list(body["errors"]["items"]) == ["3"]
    assert "seconds" in body["errors"]["items"]["3"]
    assert not BatchJob.objects.exists()


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ({"items": [{}]}, {"handler": ["This field is required."]}),
        ({"handler": "demo.noop", "items": "x"}, {"items": ["Expected a list of item parameter objects."]}),
        ({"handler": "demo.noop", "items": []}, {"items": ["A batch needs at least one item."]}),
        ([1, 2], {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}),
    ],
    ids=["no-handler", "items-not-a-list", "no-items", "not-an-object"],
)
def test_submit_with_bad_body_is_a_validation_problem(api_client: Any, payload: Any, errors: dict[str, Any]) -> None:
    body = assert_problem(api_client.post("/api/batches/", payload, format="json"), 400)
    assert body["errors"] == errors
    assert not BatchJob.objects.exists()


def test_submit_refuses_nul_characters_in_item_params_by_index(api_client: Any) -> None:
    items = [{}, {"k\u0000": 1}, {"v": ["a\u0000"]}]
    response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": items}, format="json")
    assert list(assert_problem(response, 400)["errors"]["items"]) == ["1", "2"]


def test_submit_with_malformed_json_is_a_problem(api_client: Any) -> None:
    response = api_client.post("/api/batches/", "{not json", content_type="application/json")
    assert_problem(response, 400)


def test_submit_of_too_many_items_is_413(api_client: Any, settings: Any) -> None:
    settings.BATCH_MAX_ITEMS_PER_BATCH = 2
    response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": [{}, {}, {}]}, format="json")
    body = assert_problem(response, 413)
    assert "items" in body["errors"]


def test_submit_body_over_the_size_limit_is_413(api_client: Any, settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    response = api_client.post("/api/batches/", {"handler": "demo.noop", "items": [{}] * 1000}, format="json")
    assert_problem(response, 413)
    assert not BatchJob.objects.exists()


def test_submit_of_unsupported_media_type_is_415(api_client: Any) -> None:
    response = api_client.post("/api/batches/", "handler=demo.noop", content_type="text/plain")
    assert_problem(response, 415)


def test_submit_is_throttled_with_429_and_retry_after(api_client: Any, settings: Any) -> None:
    settings.BATCH_SUBMIT_THROTTLE_RATE = "2/min"
    body = {"handler": "demo.noop", "items": [{}]}
    assert [api_client.post("/api/batches/", body, format="json").status_code for _ in range(2)] == [201, 201]
    response = api_client.post("/api/batches/", body, format="json")
    assert_problem(response, 429)
    assert int(response["Retry-After"]) > 0
    assert api_client.get("/api/batches/").status_code == 200  # only submits are throttled


def test_idempotency_key_retry_returns_the_first_batch(api_client: Any) -> None:
    body = {"handler": "demo.noop", "items": [{}]}
    first = api_client.post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    again = api_client.post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="k-1")
    other = api_client.post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="k-2")
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]
    assert BatchJob.objects.count() == 2


def test_idempotency_keys_belong_to_their_user(client_for: Any, user: Any, make_user: Any) -> None:
    body = {"handler": "demo.noop", "items": [{}]}
    mine = client_for(user).post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="same")
    theirs = client_for(make_user("bob")).post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="same")
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]


def test_overlong_idempotency_key_is_a_validation_problem(api_client: Any) -> None:
    body = {"handler": "demo.noop", "items": [{}]}
    response = api_client.post("/api/batches/", body, format="json", HTTP_IDEMPOTENCY_KEY="k" * 256)
    assert "Idempotency-Key" in assert_problem(response, 400)["errors"]


# --- GET /api/batches/ and /api/batches/{id}/ ----------------------------------------------------


def test_list_is_paginated_newest_first(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    ids = [str(batch_of(user, 1).pk) for _ in range(3)]
    page = api_client.get("/api/batches/?page_size=2").json()
    assert set(page) == {"count", "next", "previous", "results"}
    assert page["count"] == 3 and page["previous"] is None and page["next"]
    assert [b["id"] for b in page["results"]] == ids[::-1][:2]
    assert [b["id"] for b in api_client.get(page["next"]).json()["results"]] == ids[:1]


def test_list_filters_by_status_and_handler(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], submit: Callable[..., BatchJob]
) -> None:
    done = batch_of(user, 1)
    finish(done)
    pending = batch_of(user, 1)
    noop = submit("demo.noop", [{}], created_by=user)
    assert [b["id"] for b in api_client.get("/api/batches/?status=succeeded").json()["results"]] == [str(done.pk)]
    by_handler = api_client.get("/api/batches/?handler=demo.sleep&status=pending").json()["results"]
    assert [b["id"] for b in by_handler] == [str(pending.pk)]
    assert [b["id"] for b in api_client.get("/api/batches/?handler=demo.noop").json()["results"]] == [str(noop.pk)]


@pytest.mark.parametrize(
    ("query", "status", "errors"),
    [
        ("status=bogus", 400, {"status": ['"bogus" is not a valid choice.']}),
        ("page=99", 404, None),  # out of range
        ("page_size=x&page=x", 404, None),  # not a page number: DRF's "Invalid page."
    ],
)
def test_list_rejects_bad_query_values(api_client: Any, query: str, status: int, errors: Any) -> None:
    body = assert_problem(api_client.get(f"/api/batches/?{query}"), status)
    assert body.get("errors") == errors
    if status == 404:
        assert body["detail"] == "Invalid page."


def test_detail_returns_the_batch(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 2)
    data = api_client.get(f"/api/batches/{batch.pk}/").json()
    assert data["id"] == str(batch.pk) and data["total_items"] == 2 and data.keys() >= BATCH_FIELDS


@pytest.mark.parametrize("batch_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_detail_of_unknown_batch_is_404(api_client: Any, batch_id: str) -> None:
    assert_problem(api_client.get(f"/api/batches/{batch_id}/"), 404)


# --- PATCH ------------------------------------------------------------------------------------


def test_patch_changes_max_parallel(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 2, max_parallel=1)
    response = api_client.patch(f"/api/batches/{batch.pk}/", {"max_parallel": 3}, format="json")
    assert response.status_code == 200
    assert (response.json()["max_parallel"], response.json()["effective_parallel"]) == (3, 3)
    batch.refresh_from_db()
    assert batch.max_parallel == 3


@pytest.mark.parametrize("body", [{"max_parallel": 0}, {"max_parallel": "x"}, {}, {"max_parallel": 10**6}])
def test_patch_with_bad_value_is_400(api_client: Any, user: Any, batch_of: Callable[..., BatchJob], body: Any) -> None:
    batch = batch_of(user)
    problem = assert_problem(api_client.patch(f"/api/batches/{batch.pk}/", body, format="json"), 400)
    assert "max_parallel" in problem["errors"]


def test_patch_of_unknown_batch_is_404(api_client: Any) -> None:
    assert_problem(api_client.patch(f"/api/batches/{uuid.uuid4()}/", {"max_parallel": 2}, format="json"), 404)


def test_patch_of_finished_batch_is_409(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 1)
    finish(batch)
    assert_problem(api_client.patch(f"/api/batches/{batch.pk}/", {"max_parallel": 2}, format="json"), 409)


# --- DELETE and POST cancel (no worker: nothing runs, so nothing to drain) -----------------------


@pytest.mark.parametrize("how", ["delete", "post"])
def test_cancel_of_pending_batch_answers_200_cancelled(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], how: str
) -> None:
    batch = batch_of(user, 3)
    if how == "delete":
        response = api_client.delete(f"/api/batches/{batch.pk}/")
    else:
        response = api_client.post(f"/api/batches/{batch.pk}/cancel/")
    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["status"], data["cancelled_items"], data["pending_items"]) == ("cancelled", 3, 0)
    assert data["cancel_requested_at"] is not None


@pytest.mark.parametrize("how", ["delete", "post"])
def test_cancel_of_finished_batch_is_409(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], how: str
) -> None:
    batch = batch_of(user, 1)
    finish(batch)
    path = f"/api/batches/{batch.pk}/" if how == "delete" else f"/api/batches/{batch.pk}/cancel/"
    response = api_client.delete(path) if how == "delete" else api_client.post(path)
    assert "succeeded" in assert_problem(response, 409)["detail"]


@pytest.mark.parametrize("how", ["delete", "post"])
def test_cancel_of_unknown_batch_is_404(api_client: Any, how: str) -> None:
    path = f"/api/batches/{uuid.uuid4()}/"
    response = api_client.delete(path) if how == "delete" else api_client.post(path + "cancel/")
    assert_problem(response, 404)


@pytest.mark.parametrize("value", ["abc", "-1", "301", "nan"])
def test_cancel_with_bad_drain_timeout_is_400_naming_the_field(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], value: str
) -> None:
    batch = batch_of(user)
    body = assert_problem(api_client.delete(f"/api/batches/{batch.pk}/?drain_timeout={value}"), 400)
    assert "drain_timeout" in body["errors"]
    batch.refresh_from_db()
    assert batch.status == BatchStatus.PENDING  # refused before anything was cancelled


def test_cancel_that_does_not_drain_in_time_is_504_with_running_count(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user, 3)
    claimed = services.claim_items(batch_id=batch.pk, worker_id="w", limit=1, lease_seconds=30)
    response = api_client.delete(f"/api/batches/{batch.pk}/?drain_timeout=0.2")
    body = assert_problem(response, 504)
    assert (body["running_items"], body["batch"]["status"], body["batch"]["running_items"]) == (1, "cancelling", 1)
    again = api_client.post(f"/api/batches/{batch.pk}/cancel/?drain_timeout=0")  # cancelling again waits, no 409
    assert_problem(again, 504)
    outcome = services.Outcome(item_id=claimed[0].id, status="cancelled")
    services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=[outcome])
    final = api_client.delete(f"/api/batches/{batch.pk}/?drain_timeout=1")
    assert final.status_code == 409  # cancelled now: terminal


# --- items --------------------------------------------------------------------------------------


def test_items_are_paginated_in_index_order(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 5)
    page = api_client.get(f"/api/batches/{batch.pk}/items/?page_size=2").json()
    assert page["count"] == 5 and page["next"] and page["previous"] is None
    assert [item["index"] for item in page["results"]] == [0, 1]
    assert set(page["results"][0]) == ITEM_FIELDS
    last = api_client.get(f"/api/batches/{batch.pk}/items/?page_size=2&page=3").json()
    assert [item["index"] for item in last["results"]] == [4] and last["next"] is None


def test_items_filter_by_status(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user, 4)
    services.claim_items(batch_id=batch.pk, worker_id="w", limit=2, lease_seconds=30)
    running = api_client.get(f"/api/batches/{batch.pk}/items/?status=running").json()
    assert running["count"] == 2 and [i["index"] for i in running["results"]] == [0, 1]
    pending = api_client.get(f"/api/batches/{batch.pk}/items/?status=pending").json()
    assert pending["count"] == 2 and {i["status"] for i in pending["results"]} == {"pending"}
    services.request_cancel(batch_id=batch.pk)
    claimed = [i["id"] for i in running["results"]]
    outcomes = [services.Outcome(item_id=i, status="cancelled") for i in claimed]
    services.complete_items(batch_id=batch.pk, worker_id="w", outcomes=outcomes)


def test_items_with_bad_status_filter_is_400(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user)
    assert "status" in assert_problem(api_client.get(f"/api/batches/{batch.pk}/items/?status=x"), 400)["errors"]


def test_items_of_unknown_batch_is_404(api_client: Any) -> None:
    assert_problem(api_client.get(f"/api/batches/{uuid.uuid4()}/items/"), 404)


# --- auth, isolation, errors ----------------------------------------------------------------------


def test_anonymous_gets_401_with_www_authenticate(client_for: Any, user: Any, batch_of: Callable[..., Any]) -> None:
    anonymous = client_for(None)
    batch = batch_of(user)
    for response in (
        anonymous.get("/api/batches/"),
        anonymous.post("/api/batches/", {"handler": "demo.noop", "items": [{}]}, format="json"),
        anonymous.get(f"/api/batches/{batch.pk}/"),
        anonymous.delete(f"/api/batches/{batch.pk}/"),
    ):
        assert_problem(response, 401)
        assert response["WWW-Authenticate"] == "Token"
    batch.refresh_from_db()
    assert batch.status == BatchStatus.PENDING


def test_other_users_batch_is_invisible_even_when_finished(
    client_for: Any, user: Any, make_user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    live, done = batch_of(user, 2), batch_of(user, 1)
    finish(done)
    bob = client_for(make_user("bob"))
    for batch in (live, done):
        assert_problem(bob.get(f"/api/batches/{batch.pk}/"), 404)
        assert_problem(bob.get(f"/api/batches/{batch.pk}/items/"), 404)
        assert_problem(bob.patch(f"/api/batches/{batch.pk}/", {"max_parallel": 2}, format="json"), 404)
        assert_problem(bob.delete(f"/api/batches/{batch.pk}/"), 404)  # 404, never 409
        assert_problem(bob.post(f"/api/batches/{batch.pk}/cancel/"), 404)
    assert bob.get("/api/batches/").json()["count"] == 0
    live.refresh_from_db()
    assert (live.status, live.max_parallel) == (BatchStatus.PENDING, 4)


def test_staff_see_and_control_all_batches(
    client_for: Any, user: Any, make_user: Any, batch_of: Callable[..., BatchJob]
) -> None:
    batch = batch_of(user, 2)
    root = make_user("root", is_staff=True)
    grant(root, "view_batchjob", "resize_batchjob", "cancel_batchjob")  # batch.permissions: staff need them
    staff = client_for(root)
    assert staff.get("/api/batches/").json()["count"] == 1
    assert staff.patch(f"/api/batches/{batch.pk}/", {"max_parallel": 1}, format="json").status_code == 200
    assert staff.delete(f"/api/batches/{batch.pk}/").json()["status"] == "cancelled"


def test_method_not_allowed_is_405_problem(api_client: Any, user: Any, batch_of: Callable[..., BatchJob]) -> None:
    batch = batch_of(user)
    assert_problem(api_client.put(f"/api/batches/{batch.pk}/", {"max_parallel": 2}, format="json"), 405)
    assert_problem(api_client.delete("/api/batches/"), 405)


def test_unknown_api_path_is_404_problem(api_client: Any) -> None:
    assert_problem(api_client.get("/api/no-such-thing/"), 404)


def test_unexpected_error_is_500_problem_without_traceback(
    api_client: Any, user: Any, batch_of: Callable[..., BatchJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = batch_of(user)

    def explode(**kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(services, "resize_batch", explode)
    response = api_client.patch(f"/api/batches/{batch.pk}/", {"max_parallel": 2}, format="json")
    assert_problem(response, 500)
    assert b"secret" not in response.content and b"Traceback" not in response.content


def test_django_500_under_api_is_problem_json() -> None:
    response = server_error(RequestFactory().get("/api/batches/"))
    assert_problem(response, 500)
    assert server_error(RequestFactory().get("/admin/"))["Content-Type"].startswith("text/html")


# --- schema, docs, browsable API ----------------------------------------------------------------


def test_schema_and_docs_are_served(api_client: Any) -> None:
    schema = api_client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert {"/api/batches/", "/api/batches/{id}/", "/api/batches/{id}/cancel/", "/api/batches/{id}/items/"} <= set(
        paths
    )
    assert "application/problem+json" in paths["/api/batches/{id}/"]["delete"]["responses"]["504"]["content"]
    for page in ("/api/docs/", "/api/redoc/"):
        html = api_client.get(page, HTTP_ACCEPT="text/html").content.decode()
        assert "/static/drf_spectacular_sidecar/" in html  # local assets, no CDN


def test_browsable_api_offers_and_accepts_the_submit_form(client: Any, user: Any) -> None:
    client.force_login(user)
    page = client.get("/api/batches/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert b'name="handler"' in page.content and b'name="items"' in page.content
    form = {"handler": "demo.noop", "items": "[{}, {}]", "max_parallel": "2", "name": "from the form"}
    response = client.post("/api/batches/", form, HTTP_ACCEPT="text/html")
    assert response.status_code == 201
    batch = BatchJob.objects.get()
    assert (batch.total_items, batch.name, batch.created_by) == (2, "from the form", user)
    detail = client.get(f"/api/batches/{batch.pk}/", HTTP_ACCEPT="text/html")
    assert detail.status_code == 200 and b"max_parallel" in detail.content
