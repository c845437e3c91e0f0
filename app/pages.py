"""The pages of the app, each named once: its file, its title (in the navigation and as its heading), its icon,
and its step on the path through the pages.

The frame builds ``st.navigation`` from ``PAGES``; ``frame.page_intro`` draws a page's title; the start page's
path, the "Next:" link under every page and the pages a session has opened (``_visited``, by title) all read
``PATH``. A page names itself and the pages it links to by these constants (``pages.KL``), never by a spelt title.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    file: str  # the page's script, relative to app/ (for st.Page and st.page_link)
    title: str  # in the navigation, and as the page's heading unless it has its own
    icon: str
    step: str | None = None  # its words on the path through the pages (None: not a step)
    heading: str | None = None  # the page's heading when it is not its title

    @property
    def header(self) -> str:
        """The page's heading (frame.page_intro): its title unless it has a heading of its own."""
        return self.heading or self.title


HOME = Page("views/home.py", "Start here", ":material/home:")
SETUP = Page("views/setup.py", "Setup & cache", ":material/settings:",
             "Set up the model and cache its hidden states")
SPAN = Page("views/span.py", "Choose a span", ":material/grid_on:", "Choose a span")
TRAIN = Page("views/train.py", "Train", ":material/model_training:", "Train flows for it",
             heading="Train a latent flow")
TRAJECTORIES = Page("views/trajectories.py", "Latent trajectories", ":material/timeline:",
                    "Look at the latent trajectories")
CROSSINGS = Page("views/crossings.py", "Coupling crossings", ":material/shuffle:", "See where token paths cross")
KL = Page("views/kl.py", "Per-token KL", ":material/format_color_text:", "Measure the cost per token (KL)")
COMPARE = Page("views/compare.py", "Compare spans", ":material/compare_arrows:", "Compare spans and baselines")
TOY = Page("views/toy.py", "Teaching lab (2-D)", ":material/science:", "Replay the lesson in 2-D (teaching lab)")

PAGES = (HOME, SETUP, SPAN, TRAIN, TRAJECTORIES, CROSSINGS, KL, COMPARE, TOY)  # in the navigation's order
DEFAULT = HOME  # the page a bare link opens
PATH = tuple(page for page in PAGES if page.step)  # the path through the pages, in order
