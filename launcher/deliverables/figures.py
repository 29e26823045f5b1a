"""What every figure gpu-run draws shares: a headless backend, fonts that render the user's class
names (CJK included: matplotlib falls back per glyph along the font list), 300 dpi PNGs."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a server, and none needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402

DPI = 300
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "AR PL UMing CN",
)


CJK_FILE_HINTS = ("cjk", "wqy", "simhei", "msyh", "pingfang", "sourcehan", "uming", "ukai", "droidsansfallback")


def setup_fonts() -> None:
    # A CJK font with only a medium weight makes matplotlib say "findfont: Failed to find font
    # weight normal ... now using 500" for every label: it draws the text all the same, and the
    # user can do nothing about it.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in installed for name in CJK_FONTS):
        # matplotlib's font cache predates a CJK font installed later: register such files now.
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower() for hint in CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    pass
        installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [name for name in CJK_FONTS if name in installed]
    plt.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    plt.rcParams["axes.unicode_minus"] = False


def new_figure(*args, **kwargs):
    """plt.subplots with the fonts set up: (figure, axes)."""
    setup_fonts()
    return plt.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    """Write the figure as a PNG at DPI and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
