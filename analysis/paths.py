"""Where the repository keeps its data and reports (the bundled model and benchmark, run folders)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
BUNDLED_MODEL = DATA_DIR / "shapes-llava"
BUNDLED_BENCHMARK = DATA_DIR / "shapes"
REPORTS = REPO_ROOT / "reports"
