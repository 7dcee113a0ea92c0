#!/usr/bin/env bash
# Set up on the embedded default (SQLite, no services) and run a demo forecasting batch:
# 20 stores x 15 products = 300 items through the real worker, with a progress display.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Local settings (DJANGO_DEBUG=1 and the development key): DEBUG is off unless asked for.
[ -f .env ] || { cp .env.example .env && echo "Created .env from .env.example (DJANGO_DEBUG=1, for local use)"; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python manage.py migrate -v 0
batch_id=$(.venv/bin/python manage.py submitbatch demo.forecast --stores 20 --products 15 \
  --param horizon=28 --max-parallel 4 --name "demo forecast" -v 0)
echo "Submitted demo batch $batch_id (300 store/product forecasts); running it:"
.venv/bin/python manage.py runbatch --batch "$batch_id" --progress always
.venv/bin/python manage.py shell -v 0 -c "
from batch.models import BatchJob
b = BatchJob.objects.get(pk='$batch_id')
print(f'Batch {b.id}: {b.status}; {b.succeeded_items} succeeded, {b.failed_items} failed of {b.total_items}')
item = b.items.order_by('index').first()
print('First result:', {k: item.result[k] for k in ('store', 'product', 'best_method', 'metrics')})
"
