#!/usr/bin/env bash
# The app as a library: build the wheel, install it into a fresh virtualenv beside a project
# made by `django-admin startproject` (no batchsite on the path), wire it up as the README's
# "Add to an existing project" says, migrate, submit a batch through the REST API and run it
# with `runbatch`; then check results, the API, the dashboard page and its static files.
# Usage: scripts/wheel_smoke.sh   (PYTHON picks the interpreter of the fresh venv; KEEP=1 keeps the dir)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d -t batch-wheel-XXXXXX)
[ "${KEEP:-0}" = 1 ] && echo "work dir: $WORK" || trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== build the wheel"
[ -x "$ROOT/.venv/bin/python" ] || { echo "needs $ROOT/.venv (scripts/test.sh makes it)" >&2; exit 2; }
"$ROOT/.venv/bin/python" -m build --wheel --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }
rm -rf "$ROOT/build" "$ROOT"/*.egg-info  # setuptools' leftovers in the source tree
wheel=$(ls "$WORK"/dist/*.whl)
echo "built $(basename "$wheel")"
listing=$(unzip -Z1 "$wheel")  # once: `unzip | grep -q` can fail on SIGPIPE under pipefail
if grep -qE '^(batchsite|tests|bench|templates)/' <<<"$listing"; then echo "wheel holds more than the app" >&2; exit 1; fi
for f in batch/migrations/0001_initial.py batch/templates/admin/batch/dashboard.html \
  batch/static/batch/dashboard.js batch/static/batch/charts.js; do
  grep -qx "$f" <<<"$listing" || { echo "wheel lacks $f" >&2; exit 1; }
done

echo "== fresh virtualenv with the wheel (its declared dependencies only)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$wheel" 2>&1 | grep -v '^WARNING: Location' || true
"$WORK/venv/bin/python" -m pip show -q django-batch-runner >/dev/null
"$WORK/venv/bin/python" -c 'import django; print("Django", django.get_version())'

echo "== host project (django-admin startproject)"
cd "$WORK"
PY="$WORK/venv/bin/python"
mkdir host && "$WORK/venv/bin/django-admin" startproject hostsite host
cd host
"$PY" manage.py startapp shop
cat > shop/batch_handlers.py <<'PY'
from rest_framework import serializers

from batch.handlers import ItemContext, batch_handler


class SquareParams(serializers.Serializer):
    n = serializers.IntegerField(min_value=0)


@batch_handler("shop.square", params=SquareParams)
async def square(params: dict, ctx: ItemContext) -> dict:
    ctx.raise_if_cancelled()
    await ctx.sleep(0.01)
    return {"n": params["n"], "square": params["n"] ** 2}
PY
cat >> hostsite/settings.py <<'PY'

# --- added as the README's "Add to an existing project" says ---
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS += [
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "batch",
    "shop",
]
ASGI_APPLICATION = "hostsite.asgi.application"
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["batch.api.limits.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "batch.api.schema.ProblemAutoSchema",
    "EXCEPTION_HANDLER": "batch.api.exceptions.problem_exception_handler",
}
BATCH_GLOBAL_MAX_PARALLEL = 8  # one setting on purpose; every other BATCH_* takes the app's default
PY
cat > hostsite/urls.py <<'PY'
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/batch/dashboard/", include("batch.dashboard")),
    path("admin/", admin.site.urls),
    path("api/", include("batch.api.urls")),
]
PY
cat > hostsite/asgi.py <<'PY'
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hostsite.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from batch.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})
PY

echo "== check, migrate"
"$PY" -c 'import batchsite' 2>/dev/null && { echo "batchsite is importable from the host: not a clean install" >&2; exit 1; }
"$PY" manage.py check --fail-level WARNING
"$PY" manage.py migrate -v 0
"$PY" manage.py makemigrations --check --dry-run -v 0

echo "== submit through the REST API"
batch_id=$("$PY" manage.py shell -v 0 -c '
import json
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.authtoken.models import Token
user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
token = Token.objects.create(user=user)
client = Client(headers={"Authorization": f"Token {token.key}"})
assert client.get("/api/batches/", headers={"Authorization": ""}).status_code == 401
bad = client.post("/api/batches/", {"handler": "shop.square", "items": [{"n": -1}]}, content_type="application/json")
assert bad.status_code == 400 and bad["Content-Type"] == "application/problem+json", (bad.status_code, bad.content)
response = client.post("/api/batches/", {"handler": "shop.square", "items": [{"n": n} for n in range(25)],
                       "max_parallel": 4, "name": "wheel smoke"}, content_type="application/json")
assert response.status_code == 201, (response.status_code, response.content)
body = response.json()
assert body["status"] == "pending" and body["total_items"] == 25 and body["effective_parallel"] == 4, body
print(body["id"])
')
echo "submitted $batch_id"

echo "== run it with runbatch"
"$PY" manage.py runbatch --batch "$batch_id" --progress never

echo "== results, API, dashboard, static files"
"$PY" manage.py shell -v 0 -c "
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.test import Client
from batch.models import BatchJob
batch = BatchJob.objects.get(pk='$batch_id')
assert (batch.status, batch.succeeded_items, batch.failed_items) == ('succeeded', 25, 0), batch
results = {item.result['n']: item.result['square'] for item in batch.items.all()}
assert results == {n: n * n for n in range(25)}, results
client = Client()
client.force_login(get_user_model().objects.get(username='ops'))
detail = client.get('/api/batches/$batch_id/').json()
assert detail['status'] == 'succeeded' and detail['succeeded_items'] == 25, detail
page = client.get('/admin/batch/dashboard/$batch_id/')
assert page.status_code == 200 and b'batch/dashboard.js' in page.content, page.status_code
assert b'\"apiBatches\": \"/api/batches/\"' in client.get('/admin/batch/dashboard/').content
assert finders.find('batch/dashboard.js') and finders.find('batch/charts.js')
assert client.get('/api/schema/').status_code == 200
print(f'wheel smoke: batch {batch.pk} {batch.status}, {batch.succeeded_items}/{batch.total_items} items, results checked')
"
