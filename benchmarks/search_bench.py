"""Search proxy benchmark: cache hits, 120 concurrent clients, offline misses, against the bare index;
and fairness: another client's cached search while one client's 5,000-query /retrieve is in flight.

    .venv/bin/python benchmarks/search_bench.py [--docs 20000] [--seconds 10]

Prints one table with the proxy's figures, the baseline measured in the same run (querying the
offline index directly in-process, no HTTP, no cache) and the targets from the issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.data.search_index import OfflineIndex, build_index  # noqa: E402
from argus.supervision import free_port, wait_until  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_corpus(path: Path, n: int, rng: random.Random) -> list[str]:
    vocab = [f"w{i:05d}" for i in range(20_000)]
    with open(path, "w") as fh:
        for i in range(n):
            words = rng.choices(vocab, k=60)
            fh.write(json.dumps({"id": f"d{i}", "title": " ".join(words[:5]), "text": " ".join(words)}) + "\n")
    return vocab


def wrk_load(url: str, queries: list[str], clients: int, seconds: float, lua: Path) -> dict[str, str] | None:
    """The same load from `wrk` (C, Debian package): the Python client above needs a core of its own."""
    if shutil.which("wrk") is None:
        return None
    bodies = ",\n".join(json.dumps(json.dumps({"query": q, "top_k": 5})) for q in queries)
    lua.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{bodies}\n}}\nlocal i = 0\n"
        "request = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n"
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "-s", str(lua), "--latency", f"{url}/v1/search"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = {
        "rps": re.search(r"Requests/sec:\s+([\d.]+)", out),
        "p50": re.search(r"50%\s+(\S+)", out),
        "p99": re.search(r"99%\s+(\S+)", out),
        "non2xx": re.search(r"Non-2xx or 3xx responses: (\d+)", out),
        "sock": re.search(r"Socket errors: (.*)", out),
    }
    return {k: (m.group(1) if m else ("0" if k == "non2xx" else "none")) for k, m in figures.items()}


async def load(url: str, queries: list[str], clients: int, seconds: float) -> tuple[int, int, list[float]]:
    """`clients` concurrent clients, each sending its next query as soon as the last answered."""
    ok = errors = 0
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        end = time.monotonic() + seconds

        async def worker(seed: int) -> None:
            nonlocal ok, errors
            rng = random.Random(seed)
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    resp = await client.post("/v1/search", json={"query": rng.choice(queries), "top_k": 5})
                    if resp.status_code == 200:
                        ok += 1
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return ok, errors, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    console = Console()
    rng = random.Random(0)

    with tempfile.TemporaryDirectory(prefix="argus-search-bench-") as tmp:
        root = Path(tmp)
        vocab = make_corpus(root / "corpus.jsonl", args.docs, rng)
        t = time.perf_counter()
        build_index(root / "index.sqlite", corpus=root / "corpus.jsonl")
        console.print(f"indexed {args.docs} documents in {time.perf_counter() - t:.1f}s")
        hot = [" ".join(rng.choices(vocab, k=3)) for _ in range(200)]
        cold = [" ".join(rng.choices(vocab, k=3)) for _ in range(300)]

        # Baseline: the same index queried in-process.
        index = OfflineIndex(root / "index.sqlite")
        direct = []
        for q in cold:
            t = time.perf_counter()
            index.search(q, 5)
            direct.append(time.perf_counter() - t)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "ARGUS_SEARCH_PORT": str(port),
            "ARGUS_SEARCH_INDEX_PATH": str(root / "index.sqlite"),
            "ARGUS_SEARCH_CACHE_PATH": str(root / "cache.sqlite"),
            "ARGUS_SEARCH_CACHE_MODE": "cache-first",
            # The default upstream rate limit (5/s) stays: it guards paid APIs and must not slow the index.
            "ARGUS_SEARCH_MAX_RETRIEVE_QUERIES": "5000",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "argus.cli", "search", "serve", "--log-level", "warning"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda: _healthy(url), timeout_s=60), "search proxy did not start"
            with httpx.Client(base_url=url, timeout=30) as client:
                misses = []
                for q in cold:
                    t = time.perf_counter()
                    assert client.post("/v1/search", json={"query": q, "top_k": 5}).json()["cached"] is False
                    misses.append(time.perf_counter() - t)
                for q in hot:
                    client.post("/v1/search", json={"query": q, "top_k": 5})
                hits = []
                for i in range(1000):
                    t = time.perf_counter()
                    resp = client.post("/v1/search", json={"query": hot[i % len(hot)], "top_k": 5})
                    hits.append(time.perf_counter() - t)
                    assert resp.json()["cached"] is True
            console.print(f"120 concurrent clients for {args.seconds:.0f}s …")
            ok, errors, under_load = asyncio.run(load(url, hot, 120, args.seconds))
            wrk = wrk_load(url, hot, 120, args.seconds, root / "load.lua")
            big_s, beside = fairness(url, [" ".join(rng.choices(vocab, k=3)) for _ in range(5000)], hot)
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=30)

    ms = 1000.0
    table = Table(title=f"Argus search proxy — {os.cpu_count()} cores, {args.docs} documents")
    for col in ("metric", "proxy", "baseline (same run)", "target"):
        table.add_column(col)
    table.add_row(
        "cache hit p50 / p99 (HTTP round trip)",
        f"{pct(hits, 50) * ms:.2f} / {pct(hits, 99) * ms:.2f} ms",
        "",
        "p50 ≤ 2 ms",
    )
    table.add_row(
        "offline miss p50 / p99 (HTTP, stored)",
        f"{pct(misses, 50) * ms:.2f} / {pct(misses, 99) * ms:.2f} ms",
        f"index in-process {pct(direct, 50) * ms:.2f} / {pct(direct, 99) * ms:.2f} ms",
        "",
    )
    table.add_row("120 httpx clients: requests/s", f"{ok / args.seconds:.0f}", "(client shares the 2 cores)", "")
    table.add_row("120 httpx clients: errors", str(errors), "", "0")
    table.add_row(
        "120 httpx clients: latency p50 / p99",
        f"{pct(under_load, 50) * ms:.1f} / {pct(under_load, 99) * ms:.1f} ms",
        "",
        "",
    )
    if wrk is not None:
        table.add_row("120 wrk connections: requests/s", wrk["rps"], "", "")
        table.add_row("120 wrk connections: non-2xx / socket errors", f"{wrk['non2xx']} / {wrk['sock']}", "", "0")
        table.add_row("120 wrk connections: latency p50 / p99", f"{wrk['p50']} / {wrk['p99']}", "", "")
    table.add_row(
        f"cached search beside a 5,000-query /retrieve: p50 / max (n={len(beside)})",
        f"{pct(beside, 50) * ms:.1f} / {max(beside) * ms:.1f} ms",
        f"alone: p50 {pct(hits, 50) * ms:.2f} ms; the /retrieve took {big_s:.1f} s",
        "≤ 1 s",
    )
    table.add_row(
        "upstream (index) calls during the hit runs",
        _metric(metrics, "argus_search_upstream_calls_total"),
        f"= {len(cold) + len(hot)} distinct queries",
        "",
    )
    console.print(table)


def fairness(url: str, big: list[str], hot: list[str]) -> tuple[float, list[float]]:
    """One client's /retrieve of `big` queries, and another client's cached searches one after another
    for as long as it runs: (the /retrieve's seconds, the small client's latencies)."""
    import threading

    done = threading.Event()
    took: list[float] = []

    def big_client() -> None:
        t = time.perf_counter()
        with httpx.Client(base_url=url, timeout=600, headers={"X-Argus-Run-Id": "big"}) as c:
            assert c.post("/retrieve", json={"queries": big, "topk": 3}).status_code == 200
        took.append(time.perf_counter() - t)
        done.set()

    thread = threading.Thread(target=big_client)
    thread.start()
    latencies = []
    with httpx.Client(base_url=url, timeout=60, headers={"X-Argus-Run-Id": "small"}) as small:
        time.sleep(0.5)  # the big request is parsed and its searches queued
        i = 0
        while not done.is_set():
            t = time.perf_counter()
            assert small.post("/v1/search", json={"query": hot[i % len(hot)], "top_k": 5}).json()["cached"]
            latencies.append(time.perf_counter() - t)
            i += 1
            time.sleep(0.05)
    thread.join()
    return took[0], latencies or [float("nan")]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _metric(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name):
            return str(int(float(line.rsplit(" ", 1)[1])))
    return "?"


if __name__ == "__main__":
    main()
