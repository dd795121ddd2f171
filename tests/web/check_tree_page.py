#!/usr/bin/env python3
"""Headless Chromium (Playwright) renders `sandtree serve --http`'s pages.

    check_tree_page.py BASE_URL ROOT_EPISODE FORK_EPISODE SCREENSHOT

Run by tests/tests/tree_html.rs when SANDTREE_BROWSER_PYTHON names a Python with Playwright;
SANDTREE_CHROMIUM names the browser binary (default: Debian's `chromium`, /usr/bin/chromium).
Checks: the index links both episodes and following a link opens the tree page; the page renders
one SVG circle per turn record, each with a non-zero box and the fill of its kind; node sizes
follow the checkpoint bytes (more bytes never a smaller node, a node with bytes larger than one
without); the live heads have the thick red stroke; no hover card shows until a node is hovered,
and hovering a node shows its own card, with its command and its output (escaped markup stays
text, no element), and moving off hides it; nothing is logged to the console and no script runs.
It saves a screenshot of the page with a card shown at SCREENSHOT (a PNG).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile

from playwright.sync_api import sync_playwright

FILLS = {
    "base": "rgb(255, 255, 255)",
    "shared": "rgb(200, 200, 200)",
    "fs": "rgb(111, 168, 220)",
    "full": "rgb(230, 145, 56)",
}


# Debian's chromium as a headless browser on a closed network: no first-run, sync, component
# updates or background requests (each would try to reach Google's hosts), a fresh profile.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> int:
    base, root, fork, shot = sys.argv[1:5]
    exe = os.environ.get("SANDTREE_CHROMIUM") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory(prefix="sandtree-chromium-") as profile, sync_playwright() as p:
        # A persistent context is the one way Playwright takes a --user-data-dir of ours.
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=exe, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}
        )
        page = ctx.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        page.on("pageerror", lambda e: console.append(str(e)))
        page.goto(base + "/")
        links = page.locator("a.episode")
        ids = [links.nth(i).inner_text() for i in range(links.count())]
        assert root in ids and fork in ids, ids
        page.click(f"a[href='/episodes/{fork}']")
        page.wait_for_load_state()
        assert page.url.endswith(f"/episodes/{fork}"), page.url
        nodes = page.locator("svg circle.node")
        n = nodes.count()
        assert n >= 2, n
        live = 0
        sizes: list[tuple[int, float]] = []
        for i in range(n):
            c = nodes.nth(i)
            box = c.bounding_box()
            assert box and box["width"] > 0 and box["height"] > 0, box
            # The rendered diameter of the fill (the bounding box adds the stroke, thicker on
            # live heads).
            diameter = c.evaluate("e => e.getBBox().width * e.getScreenCTM().a")
            sizes.append((int(c.get_attribute("data-bytes") or "x"), diameter))
            cls = (c.get_attribute("class") or "").split()
            kind = next(k[5:] for k in cls if k.startswith("kind-"))
            style = c.evaluate(
                "e => { const s = getComputedStyle(e); return [s.fill, s.stroke, s.strokeWidth]; }"
            )
            assert style[0] == FILLS[kind], (kind, style)
            if "live" in cls:
                live += 1
                assert style[1] == "rgb(221, 0, 0)" and style[2] == "3px", style
        assert live >= 1, live
        # Sized by checkpoint bytes: the rendered diameter never shrinks as the bytes grow, and
        # a node with bytes is larger than one without.
        sizes.sort()
        for (b1, w1), (b2, w2) in itertools.pairwise(sizes):
            assert w1 <= w2 + 0.01, (b1, w1, b2, w2)
        assert sizes[0][0] == 0 and sizes[-1][0] > 0, sizes
        assert sizes[-1][1] > sizes[0][1] + 1, sizes
        # Hover: no card shows before; hovering each node shows its own card with its command
        # (and its output, for the one that printed markup), and only that one.
        tips = page.locator("pre.tip")
        assert tips.count() == n, (tips.count(), n)
        assert page.locator("pre.tip:visible").count() == 0
        marked = None
        for i in range(n):
            c = nodes.nth(i)
            rec = c.get_attribute("data-record")
            c.hover()
            tip = page.locator(f"#t{rec}")
            tip.wait_for(state="visible", timeout=2000)
            assert page.locator("pre.tip:visible").count() == 1
            text = tip.inner_text()
            assert text.startswith(f"turn {c.get_attribute('data-turn')} (record {rec},"), text
            assert "\n$ " in text, text
            if "<b>bold</b>" in text:
                marked = (i, text)
        assert marked is not None, "no card shows the command and output with the markup"
        i, text = marked
        assert "--- stdout\n<b>bold</b>" in text, text
        assert page.locator("svg b, pre.tip b").count() == 0, "escaped markup must stay text"
        # The screenshot with that card shown; then moving off hides it.
        nodes.nth(i).hover()
        tip = page.locator(f"#t{nodes.nth(i).get_attribute('data-record')}")
        tip.wait_for(state="visible", timeout=2000)
        page.screenshot(path=shot, full_page=True)
        page.mouse.move(0, 0)
        tip.wait_for(state="hidden", timeout=2000)
        assert page.locator("pre.tip:visible").count() == 0
        assert page.evaluate("document.scripts.length") == 0
        assert not console, console
        ctx.close()
    print(
        f"browser {exe}: index lists {len(ids)} episodes; tree page renders {n} nodes, {live} live, "
        f"sizes {sizes}; hover cards checked; screenshot {shot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
