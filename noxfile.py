"""The support matrix: Django 5.2 LTS and 6.1, each on the oldest Python it supports.

    nox -l                           # every session
    nox                              # what CI runs (.ci/run does the same without nox)
    nox -s "tests(django='6.1', db='sqlite')"
    nox -s wheel_smoke

Each session calls the scripts CI calls (`scripts/test.sh`, `scripts/wheel_smoke.sh`), in a
virtualenv nox makes; `constraints/django-<version>.txt` pins each Django exactly.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHON_FOR_DJANGO = {"5.2": "3.11", "6.1": "3.12"}
# CI: the whole suite (SQLite and PostgreSQL) on 5.2, the PostgreSQL pass again on 6.1
# (there `-m "not slow or browser"`: .ci/run says why).
CI_MATRIX = [("5.2", "sqlite"), ("5.2", "postgres"), ("6.1", "postgres")]

nox.options.default_venv_backend = "venv"
nox.options.sessions = [f"tests(django='{django}', db='{db}')" for django, db in CI_MATRIX] + ["wheel_smoke"]


def interpreter(version: str) -> str:
    """An interpreter of at least `version`: on PATH or among pyenv's (scripts/python_for.sh)."""
    script = ROOT / "scripts" / "python_for.sh"
    return subprocess.run([str(script), version], check=True, capture_output=True, text=True).stdout.strip()


@nox.session(python=False)
@nox.parametrize("db", ["sqlite", "postgres"])
@nox.parametrize("django", list(PYTHON_FOR_DJANGO))
def tests(session: nox.Session, django: str, db: str) -> None:
    """The suite on one Django and one database, in .nox/django-<version> (kept between runs)."""
    venv = ROOT / ".nox" / f"django-{django}"
    env = {"DJANGO": django, "VENV": str(venv), "TEST_DATABASES": db, "PYTHON": interpreter(PYTHON_FOR_DJANGO[django])}
    session.run(str(ROOT / "scripts" / "test.sh"), *session.posargs, env=env, external=True)


@nox.session(python=False)
def wheel_smoke(session: nox.Session) -> None:
    """Build the wheel and run a batch with it in a fresh project (needs .venv: scripts/test.sh)."""
    session.run(str(ROOT / "scripts" / "wheel_smoke.sh"), env={"PYTHON": interpreter("3.11")}, external=True)
