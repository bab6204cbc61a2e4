"""Where the repository keeps its data and reports (the bundled model and benchmark, run folders), and how files
the project writes record a path."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
BUNDLED_MODEL = DATA_DIR / "shapes-llava"
BUNDLED_BENCHMARK = DATA_DIR / "shapes"
REPORTS = REPO_ROOT / "reports"


def relative_to_repo(path: str | Path) -> str:
    """``path`` as a file the project writes records it: relative to the repository root when it lies inside the
    repository (a committed file then holds no machine's absolute path), else exactly as given."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)
