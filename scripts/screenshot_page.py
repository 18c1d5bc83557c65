"""Screenshot the live cache page of `mer serve` with headless Chromium, under real load.

Starts the server in-process on the given store (default: the demo store under a cache of a
quarter of its experts), keeps ``--clients`` streaming requests running, waits for the page's
rate window to fill, then runs ``chromium --headless --screenshot``. Writes
docs/img/server-cache-page.png by default.

    python scripts/screenshot_page.py [--store DIR] [--cache-mb MB] [--out PATH]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

import micro_expert_router as mer
from micro_expert_router.demo.store import default_cache_bytes, demo_store_path
from micro_expert_router.server import create_app

PROMPTS = ["The secret of life is", "Never trust a man who", "The best things in life are",
           "If at first you don't succeed,", "A fool and his money", "Love is"]  # fmt: skip


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def screenshot(url: str, out: Path, width: int = 1280, height: int = 720) -> None:
    exe = chromium()
    if exe is None:
        sys.exit("no chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=4000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--cache-mb", type=float, default=None)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--out", default="docs/img/server-cache-page.png")
    args = ap.parse_args()
    store = Path(args.store) if args.store else demo_store_path()
    budget = int(args.cache_mb * 1e6) if args.cache_mb is not None else default_cache_bytes(store)
    engine = mer.load(store, cache_bytes=budget, max_context=512)
    app = create_app(engine, model_name=store.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            httpx.post(url + "/v1/completions", timeout=120, json={
                "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 64, "temperature": 0.9,
                "seed": i})  # fmt: skip

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(8)  # the page's rates cover the last ~5 s
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(url + "/?poll", out)
    stop.set()
    for t in threads:
        t.join()
    server.should_exit = True
    time.sleep(1)
    engine.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
