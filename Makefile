# `make demo` sets up and runs a demo forecasting batch; `make test` runs every test.
.PHONY: demo test lint
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
# Local settings (DJANGO_DEBUG=1): DEBUG is off unless asked for; scripts/demo.sh does the same.
.env:
	cp .env.example .env
lint: .env
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy . && \
	.venv/bin/python manage.py makemigrations --check --dry-run
