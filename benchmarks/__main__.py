"""``python -m benchmarks``: list, run one configuration, or run every benchmark quickly (see benchmarks/runner.py)."""

import logging
import warnings

from benchmarks.runner import main

# The program's own output only: Lightning's per-fit banners and the single-process loader advice are noise here.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
raise SystemExit(main())
