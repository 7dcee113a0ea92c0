#!/usr/bin/env bash
# Install the test dependencies and run the whole suite on SQLite, then on PostgreSQL.
# Extra arguments go to pytest (e.g. scripts/test.sh -k cancel).
# TEST_POSTGRES_URL picks the server; without one reachable, the PostgreSQL pass skips its
# tests with a "needs service:" reason (CI sets BATCH_REQUIRE_SERVICES=1: then they fail).
# The Django matrix (noxfile.py, .ci/run) uses the same script:
#   DJANGO=6.1 VENV=.venv-dj61 TEST_DATABASES=postgres scripts/test.sh
# DJANGO picks constraints/django-$DJANGO.txt (default 5.2, requirements.txt's); VENV the
# virtualenv (made with PYTHON, default python3); TEST_DATABASES the passes ("sqlite postgres").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DJANGO=${DJANGO:-5.2}
TEST_DATABASES=${TEST_DATABASES:-sqlite postgres}
[ -f "constraints/django-$DJANGO.txt" ] || { echo "no constraints/django-$DJANGO.txt" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ "$DJANGO" != 5.2 ]; then  # requirements.txt pins 5.2; this Django replaces it
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "constraints/django-$DJANGO.txt" Django
  "$VENV/bin/python" -m pip check
fi
echo "== Django $("$VENV/bin/python" -c 'import django; print(django.get_version())') on Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"

status=0
for db in $TEST_DATABASES; do
  case $db in
    sqlite)
      echo "== tests on SQLite"
      env -u DATABASE_URL "$VENV/bin/python" -m pytest "$@" || status=$? ;;
    postgres)
      echo "== tests on PostgreSQL"
      DATABASE_URL=${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/batchsite} \
        "$VENV/bin/python" -m pytest "$@" || status=$? ;;
    *) echo "unknown database pass: $db" >&2; exit 2 ;;
  esac
done
exit $status
