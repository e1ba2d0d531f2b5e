"""Derive the planner's constants (vramfit/calibration/calibration.json) from measured JSONL.

Usage: python benchmarks/derive_calibration.py [FILE.jsonl ...] (default: every benchmarks/results/*/*.jsonl).
The fit itself is ``vramfit.calibration.derive`` (``plan --check`` refits with it, leaving one row out at a time).
"""

import glob
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramfit.calibration.derive import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:] or sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "*" / "*.jsonl"))))
