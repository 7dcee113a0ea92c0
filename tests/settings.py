"""Settings of the test suite: the project's, with the local default DJANGO_DEBUG=1 (DEBUG is
off unless asked for; the tests that check production settings set DJANGO_DEBUG=0 themselves).
Workers and servers the tests start inherit DJANGO_SETTINGS_MODULE, so they read this too."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_DEBUG", "1")

from batchsite.settings import *  # noqa: F403
