"""Security round 2 (issue 15): defaults of a deployment. DEBUG is off unless asked for, a weak
key is refused, demo handlers only where asked for, the schema needs a token, resize is
throttled, the WebSocket origin check compares scheme and port."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

PROBE = (
    "import json; from django.conf import settings as s; from django.test import Client;"
    "from batch.handlers import registered_handlers;"
    "r = Client().get('/api/nope/', secure=True, HTTP_ACCEPT='application/json');"
    "print(json.dumps({'debug': s.DEBUG, 'handlers': sorted(registered_handlers()), 'status': r.status_code,"
    " 'type': r['Content-Type'], 'body': r.content.decode()[:2000]}))"
)


def manage(*args: str, env_file: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """manage.py with none of this machine's DJANGO_*/BATCH_* settings, and `.env` only if given."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "DATABASE_URL", "BATCH_"))}
    environ["DJANGO_ENV_FILE"] = str(env_file or ROOT / "no-such.env")
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def probe(env_file: Path | None = None, **env: str) -> dict[str, Any]:
    result = manage("shell", "-v", "0", "-c", PROBE, env_file=env_file, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


STRONG_KEY = secrets.token_urlsafe(50)


# --- 8. unsafe defaults --------------------------------------------------------------------------


@pytest.mark.slow
def test_debug_is_off_when_unset_and_an_unknown_api_path_is_a_problem_not_the_debug_page() -> None:
    seen = probe(DJANGO_SECRET_KEY=STRONG_KEY)
    assert seen["debug"] is False
    assert (seen["status"], seen["type"]) == (404, "application/problem+json")
    assert "urlpatterns" not in seen["body"] and "api/batches" not in seen["body"]


@pytest.mark.slow
def test_unset_debug_refuses_the_development_key() -> None:
    result = manage("check")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG=0" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    ["k" * 80, "abcd" * 20, secrets.token_urlsafe(50)[:49], "django-insecure-" + secrets.token_urlsafe(50)],
    ids=["one-character", "four-distinct", "49-characters", "insecure-prefix"],
)
def test_production_refuses_a_weak_secret_key(key: str) -> None:
    result = manage("check", DJANGO_DEBUG="0", DJANGO_SECRET_KEY=key)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY must be set" in result.stderr


@pytest.mark.slow
def test_env_file_turns_debug_on_for_local_use_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    assert probe(env_file)["debug"] is True  # .env.example keeps DJANGO_DEBUG=1
    assert probe(env_file, DJANGO_DEBUG="0", DJANGO_SECRET_KEY=STRONG_KEY)["debug"] is False
    env_file.write_text('# quoted values, export prefix\nexport DJANGO_DEBUG="1"\n')
    assert probe(env_file)["debug"] is True


# --- 3. demo handlers only where asked for ---------------------------------------------------------

DEMO = ["demo.forecast", "demo.noop", "demo.sleep"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "registered"),
    [
        ({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": STRONG_KEY}, False),
        ({"DJANGO_SECRET_KEY": STRONG_KEY}, False),  # DEBUG unset: production
        ({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": STRONG_KEY, "BATCH_DEMO_HANDLERS": "1"}, True),
        ({"DJANGO_DEBUG": "1"}, True),
        ({"DJANGO_DEBUG": "1", "BATCH_DEMO_HANDLERS": "0"}, False),
    ],
    ids=["production", "unset", "production-opted-in", "debug", "debug-opted-out"],
)
def test_demo_handlers_are_registered_only_with_batch_demo_handlers(env: dict[str, str], registered: bool) -> None:
    handlers = probe(**env)["handlers"]
    assert all((name in handlers) is registered for name in DEMO), handlers


@pytest.mark.slow
def test_production_submit_of_demo_sleep_is_400_unknown_handler() -> None:
    code = (
        "import json; from django.contrib.auth.models import User; from rest_framework.test import APIClient;"
        "from django.test.utils import setup_databases, setup_test_environment;"
        "setup_test_environment(); setup_databases(0, False);"  # an in-memory database of its own
        "c = APIClient(); c.force_authenticate(User.objects.create(username='u'));"
        "r = c.post('/api/batches/', {'handler': 'demo.sleep', 'items': [{'seconds': 3600, 'cooperative': False}]},"
        " format='json', secure=True);"
        "print(json.dumps([r.status_code, r.json()]))"
    )
    result = manage(
        "shell",
        "-v",
        "0",
        "-c",
        code,
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=STRONG_KEY,
        DATABASE_URL="sqlite:///:memory:",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    status, body = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == 400
    assert "handler" in body["errors"]


# --- 9. smaller -------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/schema/", "/api/schema/?format=json", "/api/docs/", "/api/redoc/"])
def test_schema_and_docs_need_a_token_or_session(client_for: Any, user: Any, path: str) -> None:
    from tests.problems import assert_problem

    anonymous = client_for(None).get(path, HTTP_ACCEPT="*/*")
    assert_problem(anonymous, 401)
    assert anonymous["WWW-Authenticate"] == "Token"
    if "docs" in path or "redoc" in path:  # HTML pages: a JSON-only client gets a problem body, not text
        assert_problem(client_for(None).get(path, HTTP_ACCEPT="application/json"), 406)
    assert client_for(user).get(path, HTTP_ACCEPT="*/*").status_code == 200


@pytest.mark.django_db
def test_resize_is_throttled_per_user_and_a_refused_resize_writes_no_audit_row(
    api_client: Any, user: Any, submit: Any, settings: Any
) -> None:
    from django.core.cache import cache

    from tests.problems import assert_problem

    settings.BATCH_RESIZE_THROTTLE_RATE = "2/min"
    cache.clear()
    batch = submit("demo.sleep", [{"seconds": 1}], created_by=user)
    codes = [api_client.patch(f"/api/batches/{batch.pk}/", {"max_parallel": n}, format="json") for n in (1, 2, 3)]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    assert "Retry-After" in assert_problem(codes[2], 429) or codes[2].has_header("Retry-After")
    batch.refresh_from_db()
    assert batch.max_parallel == 2
    assert list(batch.audit_events.values_list("action", flat=True)) == ["submitted", "resized", "resized"]
    cache.clear()


@pytest.mark.django_db
def test_browsable_api_describes_the_permission_rule(client: Any, user: Any) -> None:
    client.force_login(user)
    page = client.get("/api/batches/", HTTP_ACCEPT="text/html").content.decode()
    assert "staff: all" not in page
    assert "view_batchjob" in page
