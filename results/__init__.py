"""The results store (runs/, gitignored) and the code that reads it; generated tables live in tables/."""
from results.store import FINAL_STATUSES, STATUSES, RunDir, iter_run_dirs, run_id  # noqa: F401
