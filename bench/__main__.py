"""`python -m bench [scenario ...] [--quick] [--repeat N] [--size NAME=N] [--repo CHECKOUT]`:
run, summarize, write results.

The database is DATABASE_URL (or --database-url). The suite empties the engine's tables
before every repetition, so it refuses a database whose name does not contain "bench"
unless --force is given. A missing PostgreSQL database is created and migrated.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from bench import SCENARIOS, SIZABLE

logger = logging.getLogger("bench")

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/bench_batch"

SCENARIO_HELP = """\
scenarios (default sizes; --quick shrinks them, --size overrides one):
  noop         10,000 demo.noop at global cap 4 and 32: items/s, worker and PostgreSQL CPU per item
  sleep        200 x 50 ms demo.sleep at 4: wall / ideal (2.5 s)
  cancel       20 cancels of a batch with 4 running sleeps through the API: latency to the 200
  memory       worker peak RSS after a 1,000- and a 100,000-item noop batch
  connections  most PostgreSQL backends one worker holds, at parallel 4 and 32
  submit       POST /api/batches/ of 10,000 and 100,000 items
  scale        noop at cap 32 with 1, 2, 3 workers at concurrency 32
  scale16      the same with each worker at concurrency 16
  io           10,000 bench.io (one Redis round trip each) at cap 4: items/s
  sleep-io     200 bench.sleep_io (round trip, 50 ms asyncio.sleep, round trip) at 4:
               wall / ideal (ceil(200 / 4) x (50 ms + 2 round trips))
  cpu          2,000 demo.forecast (sync, CPU-bound) at parallel 1, then 4, on one worker:
               speedup = items/s at 4 / at 1, per run

io and sleep-io need Redis (BENCH_REDIS_URL or --redis-url, default redis://127.0.0.1:6379/12).

A/B against another checkout: --repo PATH runs the workers and the API server from PATH's
manage.py (its engine), with this checkout's harness, scenarios and bench handlers.
"""


def _size(raw: str) -> tuple[str, int]:
    name, _, count = raw.partition("=")
    if name not in SIZABLE or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N >= 1 and NAME one of {', '.join(SIZABLE)}")
    return name, int(count)


def _checkout(raw: str) -> Path:
    path = Path(raw).resolve()
    if not (path / "manage.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} has no manage.py")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog=SCENARIO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIOS)}; default all")
    parser.add_argument("--quick", action="store_true", help="CI smoke sizes, one repetition each")
    parser.add_argument("--repeat", type=int, help="repetitions per case (cancel: number of cancels)")
    parser.add_argument(
        "--size", type=_size, action="append", default=[], metavar="NAME=N", help="items of one scenario (repeatable)"
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--redis-url", help="Redis of io and sleep-io (default BENCH_REDIS_URL or db 12 on localhost)")
    parser.add_argument("--repo", type=_checkout, metavar="CHECKOUT", help="run the engine of this checkout (A/B)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--via", choices=["api", "services"], default="api", help="how submit/cancel are driven")
    parser.add_argument("--profile", type=Path, help="record every worker with py-spy into this directory")
    parser.add_argument("--force", action="store_true", help="allow a database without 'bench' in its name")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.sizes = dict(args.size)
    return args


def prepare_database(url: str, *, force: bool, repo: Path | None = None) -> None:
    """Point Django at `url`, create (PostgreSQL) and migrate the database; with `repo`, also
    apply that checkout's migrations (its workers run on the same tables)."""
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
    if repo is not None:
        launch = Path(__file__).resolve().parent / "launch.py"
        subprocess.run([sys.executable, str(launch), str(repo), "migrate", "--verbosity", "0"], cwd=repo, check=True)


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
    if args.redis_url:
        os.environ["BENCH_REDIS_URL"] = args.redis_url
    prepare_database(args.database_url, force=args.force, repo=args.repo)
    from bench import harness, report
    from bench.suite import run_suite

    harness.PROFILE_DIR = args.profile
    harness.WORKER_ROOT = args.repo or harness.ROOT

    document = run_suite(args.scenarios or None, quick=args.quick, repeat=args.repeat, via=args.via, sizes=args.sizes)
    json_path, md_path = report.write(document, args.out)
    sys.stdout.write(report.markdown(document))
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
