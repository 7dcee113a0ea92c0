#!/usr/bin/env bash
# Install the test dependencies and run the whole suite on SQLite, then on PostgreSQL.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cancel).
# TEST_POSTGRES_URL picks the server; without one reachable, the PostgreSQL pass skips its
# tests with a "needs service:" reason (CI sets BATCH_REQUIRE_SERVICES=1: then they fail).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

status=0
echo "== tests on SQLite"
env -u DATABASE_URL .venv/bin/python -m pytest "$@" || status=$?
echo "== tests on PostgreSQL"
DATABASE_URL=${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/batchsite} \
  .venv/bin/python -m pytest "$@" || status=$?
exit $status
