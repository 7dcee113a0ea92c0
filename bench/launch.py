"""`python bench/launch.py CHECKOUT manage.py-arguments...`: run CHECKOUT's manage.py with
this checkout's bench package.

Every process the suite starts (workers, the API server's migrations) goes through here, so
an A/B (`python -m bench --repo OTHER`) starts both sides the same way. CHECKOUT's packages
(batch, batchsite, an older bench) come first on sys.path, but `bench` is bound to this
file's package before anything imports it: BATCH_HANDLER_MODULES=bench.handlers then loads
these handlers against CHECKOUT's engine.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path


def main() -> None:
    checkout = Path(sys.argv[1]).resolve()
    here = Path(__file__).resolve().parent
    sys.path[0] = str(checkout)  # instead of this script's directory
    spec = importlib.util.spec_from_file_location("bench", here / "__init__.py", submodule_search_locations=[str(here)])
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    sys.argv = [str(checkout / "manage.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
