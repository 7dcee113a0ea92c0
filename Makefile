# `make demo` sets up and runs a demo forecasting batch; `make test` runs every test.
.PHONY: demo test lint
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy . && \
	.venv/bin/python manage.py makemigrations --check --dry-run
