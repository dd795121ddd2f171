#!/usr/bin/env python3
"""Headless Chromium (Playwright) renders `sandtree serve --http`'s pages.

    check_tree_page.py BASE_URL ROOT_EPISODE FORK_EPISODE

Run by tests/tests/tree_html.rs when SANDTREE_BROWSER_PYTHON names a Python with Playwright;
SANDTREE_CHROMIUM names the browser binary (default: Playwright's own, else
/usr/bin/chromium-headless-shell, Debian's package). Checks: the index links both episodes and
following a link opens the tree page; the page renders one SVG circle per turn record, each with
a non-zero box and the fill of its kind; the live heads have the thick red stroke; a node's
<title> tooltip holds its command and output as text (escaped markup stays text, no element);
nothing is logged to the console and no script runs.
"""

from __future__ import annotations

import os
import shutil
import sys

from playwright.sync_api import sync_playwright

FILLS = {
    "base": "rgb(255, 255, 255)",
    "shared": "rgb(200, 200, 200)",
    "fs": "rgb(111, 168, 220)",
    "full": "rgb(230, 145, 56)",
}


def main() -> int:
    base, root, fork = sys.argv[1:4]
    exe = os.environ.get("SANDTREE_CHROMIUM") or shutil.which("chromium-headless-shell")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
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
        for i in range(n):
            c = nodes.nth(i)
            box = c.bounding_box()
            assert box and box["width"] > 0 and box["height"] > 0, box
            cls = c.get_attribute("class").split()
            kind = next(k[5:] for k in cls if k.startswith("kind-"))
            style = c.evaluate(
                "e => { const s = getComputedStyle(e); return [s.fill, s.stroke, s.strokeWidth]; }"
            )
            assert style[0] == FILLS[kind], (kind, style)
            if "live" in cls:
                live += 1
                assert style[1] == "rgb(221, 0, 0)" and style[2] == "3px", style
        assert live >= 1, live
        tips = [t for t in page.locator("svg circle.node title").all_text_contents()]
        marked = [t for t in tips if "<b>bold</b>" in t]
        assert marked, tips
        assert page.locator("svg b").count() == 0, "escaped markup must stay text"
        assert page.evaluate("document.scripts.length") == 0
        assert not console, console
        if os.environ.get("SANDTREE_SCREENSHOT"):
            page.screenshot(path=os.environ["SANDTREE_SCREENSHOT"], full_page=True)
        browser.close()
    print(f"browser: index lists {len(ids)} episodes; tree page renders {n} nodes, {live} live")
    return 0


if __name__ == "__main__":
    sys.exit(main())
