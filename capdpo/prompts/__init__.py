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


@dataclass(frozen=True)
class ChatPrompt:
    """What a video LMM is asked, beyond a bare question: the user turn's ``text``, an optional
    ``system`` turn, and ``prefill``, the start of the answer the model continues from (MVBench's
    official "Best option:("). A plain ``str`` question is a ChatPrompt with only ``text``."""

    text: str
    system: str | None = None
    prefill: str = ""


def load_template(name_or_path: str) -> Template:
    """A built-in template by name (``caption_reward``) or any ``.txt`` file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt")))
        raise FileNotFoundError(f"{name_or_path}: no such prompt template (built-in: {known})")
    return Template(path.stem, path.read_text(encoding="utf-8"))


# each caption-grounded reward template's twin without the caption (claim 1's ablation)
WITHOUT_CAPTION = {"caption_reward": "reward_no_caption", "short_caption_reward": "short_reward_no_caption"}


def without_caption(name: str) -> str:
    """The no-caption twin of a caption-grounded template (``caption_reward`` -> ``reward_no_caption``)."""
    try:
        return WITHOUT_CAPTION[Path(name).stem]
    except KeyError:
        raise ValueError(f"template {name} has no twin without the caption (known: {', '.join(WITHOUT_CAPTION)}); "
                         "set repro.no_caption_template") from None
