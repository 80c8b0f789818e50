"""One job of a sweep in its own process (``compare --parallel``): python -m train.studies.compare.worker OUT JOB."""

from __future__ import annotations

import sys
from pathlib import Path

from .runner import run_job

if __name__ == "__main__":
    out, key = sys.argv[1:3]
    run_job(Path(out), key)
