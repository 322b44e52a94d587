"""Check an HTML report of `hybvit evaluate` where people read it: in headless Chromium (the system's package:
chromium, chromium-browser, google-chrome or chrome-headless-shell; on Debian `apt-get install chromium`). Fails (exit 1) on an image that does not
decode or any console message (the report writes none: an error or an uncaught exception), and saves a
screenshot.

    python benchmarks/report_browser.py eval/report.html --screenshot docs/report-screenshot.png

A copy of the report gets a small script that, once the page has loaded, reports every <img> whose data did not
decode (naturalWidth 0) with console.error and puts the count in the title; Chromium prints the DOM after the page
settles (--dump-dom) and logs the console to stderr (--enable-logging=stderr).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome-headless-shell",
            "headless_shell")
CHECK = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0));
  broken.forEach(i => console.error("broken image: " + (i.alt || i.src.slice(0, 40))));
  document.title = "hybvit-check images=" + document.images.length + " broken=" + broken.length;
});
</script>"""


def browser(name: str | None) -> str:
    found = shutil.which(name) if name else next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        sys.exit(f"no headless Chromium found (tried {', '.join([name] if name else BROWSERS)}); install the "
                 f"system's chromium package")
    return found


def check(report: Path, exe: str, screenshot: Path | None) -> list[str]:
    """Problems found in the report (empty: it renders cleanly)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        # no network: the background services would only fail to connect (and log it)
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=15000",
                 "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={Path(tmp) / 'profile'}"]
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
        r = subprocess.run([exe, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
        m = re.search(r"hybvit-check images=(\d+) broken=(\d+)", r.stdout)
        if m is None:
            problems.append("the page did not finish loading (no check result in the DOM)")
        elif int(m.group(2)):
            problems.append(f"{m.group(2)} of {m.group(1)} images do not decode")
        # the report itself writes nothing to the console: any message (an error, an uncaught exception) is a
        # problem, except the check's own lines about broken images, counted above
        problems += [line.split("] ", 1)[-1].strip() for line in r.stderr.splitlines()
                     if ":CONSOLE" in line and "broken image: " not in line]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([exe, *flags, "--window-size=1280,2400", f"--screenshot={screenshot.resolve()}",
                            report.resolve().as_uri()], capture_output=True, timeout=120, check=True)
        print(f"{report}: {m.group(1) if m else '?'} images" + (f", screenshot -> {screenshot}" if screenshot else ""))
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--browser", help="the Chromium executable (default: the first of " + ", ".join(BROWSERS) + ")")
    args = ap.parse_args()
    problems = check(args.report, browser(args.browser), args.screenshot)
    for p in problems:
        print(f"problem: {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
