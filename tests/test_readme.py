"""The README's claims that code can check: its layout section matches the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)].splitlines()


def test_every_path_the_layout_names_exists():
    tree = [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    files = {p.name for p in tree if p.is_file()}
    folders = {p.name for p in tree if p.is_dir()}
    for line in _layout():
        for name in re.findall(r"[\w.-]+\.(?:py|md|ipynb)\b|[\w-]+/", line):
            assert (name.rstrip("/") in folders) if name.endswith("/") else (name in files), name


def test_every_module_of_the_packages_is_named():
    text = "\n".join(_layout())
    for package in ("lofi", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                assert path.name in text, f"{path.relative_to(ROOT)} is missing from the README's layout"
        for folder in (ROOT / package).iterdir():
            if folder.is_dir() and not folder.name.startswith("__"):
                assert f"{folder.name}/" in text, f"{folder.relative_to(ROOT)}/ is missing from the README's layout"
