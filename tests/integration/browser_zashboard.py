"""Drive zashboard in headless Chromium against Mirage's control API, from
the lab's client namespace (run there by test_api_browser.py).

Usage: browser_zashboard.py JSON, with keys gateway, port, secret, group,
member (the select group and the member to switch it to), host (a name
the group routes), proxy_provider and rule_provider (the providers whose
pages are visited and updated from the page), shots (a directory for
screenshots). Prints one JSON
object: what the page showed and what the client saw. Every wait is
bounded; a step that fails raises, and the screenshot of the moment is
saved as failure.png first.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, WebSocket, sync_playwright

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright downloads no browser here


def main(args: dict[str, Any]) -> dict[str, Any]:
    gw, port, secret = args["gateway"], args["port"], args["secret"]
    shots = Path(args["shots"])
    ui = f"http://{gw}:{port}/ui/"
    out: dict[str, Any] = {"screenshots": [], "traffic": []}

    def api(path: str) -> Any:
        req = urllib.request.Request(f"http://{gw}:{port}{path}",
                                     headers={"Authorization": f"Bearer {secret}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def curl_from() -> str:
        body = subprocess.run(["curl", "-4", "-s", "-m", "5", f"http://{args['host']}/"],
                              capture_output=True, text=True, timeout=10).stdout
        return body.rsplit("from=", 1)[-1].strip()

    def shot(page: Page, name: str) -> None:
        path = shots / f"{name}.png"
        # Generous: the Overview's WebGL globe renders in software here, and
        # the machine is shared.
        page.screenshot(path=str(path), timeout=30_000, animations="disabled")
        out["screenshots"].append(str(path))

    def watch(ws: WebSocket) -> None:
        if "/traffic" in ws.url:
            def frame(payload: str | bytes) -> None:
                doc = json.loads(payload)
                out["traffic"].append(doc["up"] + doc["down"])
            ws.on("framereceived", frame)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    # root in a namespace; no Google services
                                    args=["--no-sandbox", "--disable-background-networking",
                                          "--disable-component-update", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(10_000)
        page.on("websocket", watch)
        try:
            # zashboard's URL parameters add the backend and log in.
            page.goto(f"{ui}?hostname={gw}&port={port}&secret={secret}")
            page.goto(ui + "#/proxies")
            group = page.get_by_text(args["group"], exact=True).first
            group.wait_for()
            out["group_card"] = page.get_by_text("SELECTOR").first.is_visible()
            group.click()  # expands the card: its members as buttons
            page.get_by_text(args["member"], exact=True).first.wait_for()
            shot(page, "proxies")

            out["from_before"] = curl_from()
            page.get_by_text(args["member"], exact=True).first.click()
            deadline = time.monotonic() + 5
            while api(f"/proxies/{args['group']}")["now"] != args["member"]:
                assert time.monotonic() < deadline, "the click did not switch the group"
                time.sleep(0.1)
            out["now"] = args["member"]
            out["from_after"] = curl_from()

            # A live connection: a request left unfinished holds it open.
            held = socket.create_connection((args["host"], 80), timeout=10)
            held.sendall(f"GET / HTTP/1.1\r\nHost: {args['host']}\r\n".encode())
            page.goto(ui + "#/connections")
            row = page.locator("tr", has_text=f"{args['host']}:80").first
            row.wait_for()
            out["row"] = row.inner_text()
            shot(page, "connections")
            row.locator("button").first.click()  # the row's close button
            held.settimeout(5)
            try:
                out["held_closed"] = held.recv(100) == b""
            except ConnectionResetError:
                out["held_closed"] = True
            held.close()
            row.wait_for(state="detached")
            out["row_gone"] = True

            page.goto(ui + "#/overview")
            page.get_by_text("UPLOAD").first.wait_for()
            ticks = len(out["traffic"])
            for _ in range(3):  # a megabyte up through the gateway, three times
                subprocess.run(["curl", "-4", "-s", "-m", "5", "-o", "/dev/null",
                                "--data-binary", "@-", f"http://{args['host']}/"],
                               input=b"x" * (1 << 20), timeout=10)
            deadline = time.monotonic() + 8  # the next ticks reach the chart
            while sum(out["traffic"][ticks:]) < 3 << 20 and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            page.wait_for_timeout(500)  # drawn
            out["traffic_while_shown"] = out["traffic"][ticks:]
            shot(page, "overview")

            page.goto(ui + "#/logs")
            # Newest first and a long list: the page's own filter finds it.
            page.get_by_placeholder("Search").first.fill("selected through the API")
            line = page.get_by_text("selected through the API").first
            line.wait_for()
            out["log_line"] = line.inner_text()
            shot(page, "logs")

            # The provider pages: each lists its provider, and its update
            # button has Mirage fetch it again (PUT /providers/...).
            for route, tab, kind, name, picture in (
                    ("proxies", "Proxy provider", "proxies", args["proxy_provider"],
                     "proxy-providers"),
                    ("rules", "Rule provider", "rules", args["rule_provider"],
                     "rule-providers")):
                page.goto(ui + "#/" + route)
                page.locator("button.nav-item", has_text=tab).first.click()
                title = page.get_by_text(name, exact=True).first
                title.wait_for()
                # The provider's card: the nearest element around its name
                # that holds buttons; its last button is "update".
                card = title.locator("xpath=ancestor::*[.//button][1]")
                out[f"{kind}_provider_card"] = card.inner_text()
                shot(page, picture)
                path = f"/providers/{kind}/{name}"
                with page.expect_response(lambda r, path=path: r.request.method == "PUT"
                                          and r.url.endswith(path)) as answer:
                    card.locator("button").last.click()
                out[f"{kind}_provider_update"] = answer.value.status
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), timeout=30_000)
            out["screenshots"].append(str(shots / "failure.png"))
            raise
        finally:
            browser.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
