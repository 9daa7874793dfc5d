"""Memory of `cvformers serve` under repeated load: rounds of 8 concurrent generate requests.

Starts the server as its own process on a free loopback port, warms it up with one request, then
sends ``--rounds`` rounds of 8 concurrent requests for 1..8 images each through gradio_client
(the test in tests/test_serve_browser.py sends one such round) and prints the server's resident
memory after each round, so a leak shows as a figure that keeps climbing.

    python benchmarks/serve_memory.py --rounds 20
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of 8 concurrent requests")
    args = parser.parse_args()
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cvformers", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):  # up to a minute for the server to come up
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = Client(url, verbose=False)
        client.predict("a yellow triangle left of a green square", "default", 4, 16, 0, 0.5, 0, 1.0, 1.25,
                       api_name="/generate")
        warm = rss_mb(server.pid)
        print(f"after one request: {warm:.0f} MB")
        for r in range(1, args.rounds + 1):
            jobs = [client.submit("a small white square below a cyan circle", "default", n, 0, n, 0.5, 0, 1.0, 1.25,
                                  api_name="/generate") for n in range(1, 9)]
            counts = [len(job.result(timeout=300)[0]) for job in jobs]
            assert counts == list(range(1, 9)), counts
            now = rss_mb(server.pid)
            print(f"round {r:3d} ({8 * r} requests): {now:.0f} MB ({100 * (now - warm) / warm:+.1f}%)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
