"""Versioned prompt templates. A template's hash is stored with every output it produced, so a
score can always be traced to the exact prompt wording that made it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def hash(self) -> str:
        return short_hash(self.text)

    def render(self, **fields: object) -> str:
        return self.text.format(**fields)


def load_template(name_or_path: str) -> Template:
    """A built-in template by name (``caption_reward``) or any ``.txt`` file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt")))
        raise FileNotFoundError(f"{name_or_path}: no such prompt template (built-in: {known})")
    return Template(path.stem, path.read_text(encoding="utf-8"))
