"""Check that a `dvc plots show` page renders its vega charts offline, in headless Chromium.

    python scripts/check_plots_render.py [dvc_plots/index.html]

Chromium runs with every host name unresolvable, so a page that still needs a CDN renders nothing.
The page passes when each vega plot div holds an SVG with drawn marks (the offline template,
egat/report_assets/vega_offline.html, makes vega-embed render SVG). Exit status 0 = rendered,
1 = not rendered, 2 = no Chromium found. Prints a JSON summary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any CDN request fails
    "--virtual-time-budget=15000",  # let vega-embed's asynchronous rendering finish before the dump
]
CDN_HINTS = ("cdn.jsdelivr.net", "unpkg.com", "cdn.plot.ly")


def find_chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def dump_dom(browser: str, html: Path, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        out = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", html.resolve().as_uri()],
            check=True, capture_output=True, text=True, timeout=timeout,
        )
    return out.stdout


def render_summary(page: str, dom: str) -> dict:
    """The page's vega plots, and what vega drew in the rendered DOM: charts, SVG roots, marks."""
    return {
        # vega-embed replaces each div's content, its inline script included: count in the page.
        "vega_divs": page.count("vegaEmbed('#"),
        "embedded": len(re.findall(r'class="[^"]*\bvega-embed\b', dom)),
        "svg_charts": len(re.findall(r'<svg[^>]*class="[^"]*\bmarks\b', dom)),
        "line_marks": len(re.findall(r'class="mark-line role-mark', dom)),
        "symbol_or_rect_marks": len(re.findall(r'class="mark-(?:symbol|rect) role-mark', dom)),
        "cdn_references": [hint for hint in CDN_HINTS if hint in dom],
    }


def rendered(summary: dict) -> bool:
    return (
        summary["vega_divs"] > 0
        and summary["svg_charts"] >= summary["vega_divs"]
        and summary["line_marks"] + summary["symbol_or_rect_marks"] > 0
        and not summary["cdn_references"]
    )


def main(argv: list[str]) -> int:
    html = Path(argv[0] if argv else "dvc_plots/index.html")
    browser = find_chromium()
    if browser is None:
        print(json.dumps({"error": f"no Chromium found (tried {', '.join(BROWSERS)})"}))
        return 2
    summary = render_summary(html.read_text(encoding="utf-8"), dump_dom(browser, html))
    summary["rendered"] = rendered(summary)
    print(json.dumps(summary, indent=2))
    return 0 if summary["rendered"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
