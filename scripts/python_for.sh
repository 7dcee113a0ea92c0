#!/usr/bin/env bash
# Print the oldest interpreter of at least Python $1 (e.g. 3.12): python3, python3.12… on PATH, then
# pyenv's versions (this machine's image ships them). Exit 1 with a hint when there is none.
set -euo pipefail
want=${1:?usage: scripts/python_for.sh 3.12}
ok() { "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$want'.split('.'))))" 2>/dev/null; }
for candidate in python3 python3.12 python3.13 python3.14; do
  path=$(command -v "$candidate" 2>/dev/null) || continue
  if ok "$path"; then echo "$path"; exit 0; fi
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for path in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$path"; then echo "$path"; exit 0; fi
done
echo "no Python >= $want found (PATH, pyenv): install one, or set PYTHON" >&2
exit 1
