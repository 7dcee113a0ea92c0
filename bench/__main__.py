"""`python -m bench [scenario ...] [--quick] [--repeat N]`: run, summarize, write results.

The database is DATABASE_URL (or --database-url). The suite empties the engine's tables
before every repetition, so it refuses a database whose name does not contain "bench"
unless --force is given. A missing PostgreSQL database is created and migrated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from bench import SCENARIOS

logger = logging.getLogger("bench")

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/bench_batch"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIOS)}; default all")
    parser.add_argument("--quick", action="store_true", help="CI smoke sizes, one repetition each")
    parser.add_argument("--repeat", type=int, help="repetitions per case (cancel: number of cancels)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--via", choices=["api", "services"], default="api", help="how submit/cancel are driven")
    parser.add_argument("--profile", type=Path, help="record every worker with py-spy into this directory")
    parser.add_argument("--force", action="store_true", help="allow a database without 'bench' in its name")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def prepare_database(url: str, *, force: bool) -> None:
    """Point Django at `url`, create (PostgreSQL) and migrate the database."""
    import dj_database_url

    name = str(dj_database_url.parse(url)["NAME"])
    if "bench" not in Path(name).name and not force:
        sys.exit(f"refusing to empty tables of {name!r}: use a database named *bench* or pass --force")
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "batchsite.settings")
    if url.startswith("postgres"):
        _create_postgres_database(url, name)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def _create_postgres_database(url: str, name: str) -> None:
    import dj_database_url
    import psycopg
    from psycopg import sql

    params = dj_database_url.parse(url)
    conninfo = {"user": params["USER"] or "postgres", "host": params["HOST"] or "127.0.0.1"}
    conninfo |= {"port": params["PORT"] or 5432, "password": params["PASSWORD"] or None}
    with psycopg.connect(dbname="postgres", autocommit=True, **conninfo) as conn:  # type: ignore[arg-type]
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            logger.info("created database %s", name)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    prepare_database(args.database_url, force=args.force)
    from bench import harness, report
    from bench.suite import run_suite

    harness.PROFILE_DIR = args.profile

    document = run_suite(args.scenarios or None, quick=args.quick, repeat=args.repeat, via=args.via)
    json_path, md_path = report.write(document, args.out)
    sys.stdout.write(report.markdown(document))
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
