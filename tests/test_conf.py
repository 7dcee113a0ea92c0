"""The app in a project that is not batchsite: its settings defaults and its system checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batch import conf
from tests.conftest import ROOT

HOST_SETTINGS = """
SECRET_KEY = "host-project-test-key"
INSTALLED_APPS = ["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                  "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
                  "rest_framework", "drf_spectacular", "channels", "batch"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
"""

REPORT = """
import json, django
from django.conf import settings
from django.core import checks
django.setup()
print(json.dumps({"settings": {name: getattr(settings, name) for name in %r},
                  "checks": sorted(message.id for message in checks.run_checks(tags=["batch"]))}))
"""


def host_project(tmp_path: Path, extra: str = "", *, settings_module: str = "hostsettings") -> dict[str, Any]:
    """Load the app in a minimal project (no batchsite, no BATCH_* settings) and report."""
    (tmp_path / f"{settings_module}.py").write_text(HOST_SETTINGS + extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCH_", "DATABASE_", "DJANGO_"))}
    env |= {"DJANGO_SETTINGS_MODULE": settings_module, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    script = REPORT % (list(conf.DEFAULTS),)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_app_defaults_apply_in_a_project_that_sets_none(tmp_path: Path) -> None:
    report = host_project(tmp_path)
    assert report["settings"] == conf.DEFAULTS
    assert report["settings"]["BATCH_GLOBAL_MAX_PARALLEL"] == 4


def test_settings_a_project_defines_win_over_app_defaults(tmp_path: Path) -> None:
    report = host_project(tmp_path, "BATCH_GLOBAL_MAX_PARALLEL = 9\nBATCH_HANDLER_MODULES = ['json']\n")
    assert report["settings"]["BATCH_GLOBAL_MAX_PARALLEL"] == 9
    assert report["settings"]["BATCH_HANDLER_MODULES"] == ["json"]
    assert report["settings"]["BATCH_CANCEL_DRAIN_TIMEOUT_SECONDS"] == 30.0


def test_checks_warn_about_drf_defaults_that_break_the_api_contract(tmp_path: Path) -> None:
    assert host_project(tmp_path)["checks"] == ["batch.W001", "batch.W002", "batch.W003"]


def test_checks_pass_with_the_documented_rest_framework_settings(tmp_path: Path) -> None:
    documented = """
REST_FRAMEWORK = {
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "batch.api.schema.ProblemAutoSchema",
    "EXCEPTION_HANDLER": "batch.api.exceptions.problem_exception_handler",
}
"""
    assert host_project(tmp_path, documented)["checks"] == []


def test_checks_name_a_missing_required_app(tmp_path: Path) -> None:
    without_channels = "INSTALLED_APPS = [app for app in INSTALLED_APPS if app != 'channels']\n"
    assert "batch.E001" in host_project(tmp_path, without_channels)["checks"]


@pytest.mark.parametrize("name", sorted(conf.DEFAULTS))
def test_reference_project_reads_each_app_setting_with_the_same_default(name: str) -> None:
    from batchsite import settings as project

    assert hasattr(project, name), f"batchsite/settings.py does not read {name}"
    if name not in os.environ:
        assert getattr(project, name) == conf.DEFAULTS[name]


def test_every_batch_setting_of_the_reference_project_has_an_app_default() -> None:
    from batchsite import settings as project

    assert {name for name in vars(project) if name.startswith("BATCH_")} <= set(conf.DEFAULTS)
