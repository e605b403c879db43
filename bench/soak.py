"""Soak test of a running server (issue 21): nothing lost, nothing unbounded, no client starving another.

    python bench/soak.py --url http://127.0.0.1:8000 [--token T] [--pid PID] [--minutes 2] [--clients 3]

`--clients` loops run side by side for `--minutes`, each request picked in turn from a mix:
  - text:    GET /generate with a sentence never asked before (TTS runs), the stream read to its end;
  - cached:  GET /get-tts-audio of a sentence asked before (served from the TTS cache);
  - bomb:    POST /generate-from-audio with two hours of silent FLAC (must be 413 at once);
  - long:    GET /get-tts-audio of 995 characters (about 52 s of speech by the server's estimate): 413 when
             the server runs with SYNCTALK_SERVER__MAX_AUDIO_SECONDS under 52, else a long synthesis;
  - flood:   WS /ws/live sending 8 s of audio at once (must close with 1008).
Per kind: status codes and latency (median, max). With `--pid` the server's resident memory (VmRSS) and
thread count are sampled every second: the first, last and largest values show whether anything grows.
Prints one JSON object. Keep `--clients` small on shared cores: every stream is paced in real time.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

KINDS = ("text", "cached", "bomb", "long", "flood")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak a running SyncTalk server with a mix of requests.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--token", help="bearer token (server.auth_token)")
    p.add_argument("--pid", type=int, help="server process id: sample its memory and threads")
    p.add_argument("--minutes", type=float, default=2.0, help="how long to run (default %(default)s)")
    p.add_argument("--clients", type=int, default=3, help="request loops side by side (default %(default)s)")
    return p.parse_args(argv)


def silent_flac(seconds: float, sr: int = 8000) -> bytes:
    """`seconds` of digital silence as FLAC: a few hundred kB for hours of audio."""
    buf = io.BytesIO()
    block = np.zeros(sr * 60, np.int16)
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
    return buf.getvalue()


def process_sample(pid: int) -> dict[str, int]:
    """VmRSS (kB) and thread count of process `pid` from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"])}


class Soak:
    """The request loops and what they saw."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        self.codes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        self.bomb = silent_flac(7200)
        self.counter = 0

    def record(self, kind: str, code: int | str, seconds: float) -> None:
        with self.lock:
            self.codes[kind][str(code)] += 1
            self.latency[kind].append(seconds)

    def one(self, client: httpx.Client, kind: str, k: int) -> int | str:
        """Make one request of `kind`; returns its status (or WebSocket close code)."""
        if kind == "text":
            with client.stream("GET", "/generate", params={"text": f"Soak sentence number {k}, never said before."}) as r:
                for _ in r.iter_raw():
                    pass
                return r.status_code
        if kind == "cached":
            return client.get("/get-tts-audio", params={"text": "The same sentence every time."}).status_code
        if kind == "bomb":
            return client.post("/generate-from-audio", files={"audio_file": ("bomb.flac", self.bomb)}).status_code
        if kind == "long":
            return client.get("/get-tts-audio", params={"text": "word " * 199}).status_code
        return asyncio.run(self.flood())

    async def flood(self) -> int | None:
        import websockets
        from websockets.exceptions import ConnectionClosed

        url = self.args.url.replace("http", "ws", 1) + "/ws/live"
        if self.args.token:
            url += f"?access_token={self.args.token}"
        second = (0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 200) * 32767).astype("<i2").tobytes()
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()
            try:
                for _ in range(8):
                    await ws.send(second)
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass
            return ws.close_code

    def loop(self, index: int, until: float) -> None:
        with httpx.Client(base_url=self.args.url, headers=self.headers, timeout=120) as client:
            i = index
            while time.monotonic() < until:
                kind = KINDS[i % len(KINDS)]
                with self.lock:
                    self.counter += 1
                    k = self.counter
                start = time.perf_counter()
                try:
                    code: int | str = self.one(client, kind, k)
                except Exception as exc:  # reported, never fatal: a soak counts failures
                    code = type(exc).__name__
                self.record(kind, code, time.perf_counter() - start)
                i += 1

    def run(self) -> dict:
        until = time.monotonic() + 60 * self.args.minutes
        samples: list[dict[str, int]] = []
        loops = [threading.Thread(target=self.loop, args=(i, until)) for i in range(self.args.clients)]
        for t in loops:
            t.start()
        while any(t.is_alive() for t in loops):
            if self.args.pid:
                samples.append(process_sample(self.args.pid))
            time.sleep(1.0)
        report: dict = {"minutes": self.args.minutes, "clients": self.args.clients,
                        "codes": {k: dict(v) for k, v in self.codes.items()},
                        "latency_s": {k: {"median": round(statistics.median(v), 3), "max": round(max(v), 3)}
                                      for k, v in self.latency.items()}}
        if samples:
            report["server"] = {key: {"first": samples[0][key], "last": samples[-1][key],
                                      "max": max(s[key] for s in samples)} for key in samples[0]}
        return report


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(Soak(parse_args(argv)).run(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
