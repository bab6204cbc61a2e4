"""Where the repository keeps its data and reports (the bundled model and benchmark, run folders), and
how a path is written into what the project commits (``portable``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
BUNDLED_MODEL = DATA_DIR / "shapes-llava"
BUNDLED_BENCHMARK = DATA_DIR / "shapes"
REPORTS = REPO_ROOT / "reports"


def portable(path: str | Path) -> str:
    """``path`` as a committed file records it: relative to the project when it is an absolute path inside
    it (``data/shapes-llava``, not the machine's folder), otherwise exactly as given."""
    given = Path(path)
    if given.is_absolute() and given.is_relative_to(REPO_ROOT):
        return given.relative_to(REPO_ROOT).as_posix()
    return str(path)
