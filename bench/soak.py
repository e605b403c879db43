"""Soak test of a server (issue 21): nothing lost, nothing unbounded, no client starving another.

    python bench/soak.py --serve [--minutes 1]                              # streams mode, demo avatar
    python bench/soak.py --url http://127.0.0.1:8000 [--token T] [--pid PID] [--minutes 10]
    python bench/soak.py --mode mix --url ... [--clients 3]                 # the request mix below

`--mode streams` (default): `--mjpeg` (8) MJPEG clients and `--ws` (4) WebSocket clients of one avatar for
`--minutes` (10 for the record, 1 for a quick run). An MJPEG client asks GET /generate for one of four
sentences in turn (synthesised once before the clients start, then served from the TTS cache) and reads
each stream to its end; a WebSocket client stays connected to /ws/live and sends speech-like audio in real
time (20 ms chunks, 3 s of sound then 1 s of silence, over and over). Reported as JSON: errors (status
codes other than 200 with their `error` code, streams without their closing boundary or with fewer parts
than announced, close codes, exceptions), per client the delivered fps (frames / seconds spent receiving)
and the p95 gap between frames, and the server's RSS at start and end (`--pid`, or the server `--serve`
starts: `api.py --avatar demo` on a free port, admitting exactly the soak's streams). RSS at start is taken
after a warm-up (a fifth of the run, at most 30 s). Goal: 0 errors and RSS growth <= 5 % over 10 minutes.

`--mode mix`: `--clients` loops run side by side for `--minutes`, each request picked in turn from a mix:
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
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from common import free_port, stop_process  # bench/common.py (the benchmarks run as scripts from bench/)

KINDS = ("text", "cached", "bomb", "long", "flood")
REPO = Path(__file__).resolve().parents[1]
SENTENCES = ("The quick brown fox jumps over the lazy dog.", "A soak test keeps every client busy for minutes.",
             "Nothing is lost, nothing grows, nobody starves.", "Frames arrive at twenty five per second.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak a running SyncTalk server with a mix of requests.")
    p.add_argument("--mode", choices=("streams", "mix"), default="streams",
                   help="streams: MJPEG + WebSocket clients; mix: the request mix (default %(default)s)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--serve", action="store_true", help="start `api.py --avatar AVATAR` on a free port and soak it")
    p.add_argument("--avatar", default="demo", help="avatar of --serve and of the streams (default %(default)s)")
    p.add_argument("--token", help="bearer token (server.auth_token)")
    p.add_argument("--pid", type=int, help="server process id: sample its memory and threads")
    p.add_argument("--minutes", type=float, default=2.0, help="how long to run (default %(default)s)")
    p.add_argument("--clients", type=int, default=3, help="mix: request loops side by side (default %(default)s)")
    p.add_argument("--mjpeg", type=int, default=8, help="streams: MJPEG clients (default %(default)s)")
    p.add_argument("--ws", type=int, default=4, help="streams: WebSocket clients (default %(default)s)")
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


# ----------------------------------------------------------------------------------------------
# Streams mode


@dataclass
class ClientStats:
    """What one streaming client saw."""

    name: str
    frames: int = 0
    receiving_s: float = 0.0  # seconds between the first and the last frame of each stream, summed
    gaps: list[float] = field(default_factory=list)
    streams: int = 0

    def add_stream(self, times: list[float]) -> None:
        """Count one stream's frame arrival times."""
        self.streams += 1
        self.frames += len(times)
        if len(times) > 1:
            self.receiving_s += times[-1] - times[0]
            self.gaps.extend(b - a for a, b in zip(times, times[1:]))

    def summary(self) -> dict:
        """fps delivered, p95 and max frame gap (ms)."""
        fps = (self.frames - self.streams) / self.receiving_s if self.receiving_s > 0 else 0.0
        gaps = np.array(self.gaps) if self.gaps else np.zeros(1)
        return {"client": self.name, "streams": self.streams, "frames": self.frames, "fps": round(fps, 2),
                "gap_p95_ms": round(1000 * float(np.percentile(gaps, 95)), 1),
                "gap_max_ms": round(1000 * float(gaps.max()), 1)}


def mjpeg_frame_times(chunks: list[tuple[float, bytes]]) -> tuple[list[float], bool]:
    """Arrival time of each complete JPEG part in received `(time, bytes)` chunks, and whether the closing
    boundary came (a part counts when its Content-Length of bytes has arrived)."""
    buf, times, offset = b"", [], 0
    for t, chunk in chunks:
        buf += chunk
        while True:
            head_end = buf.find(b"\r\n\r\n", offset)
            if buf.startswith(b"--frame--", offset):
                return times, True
            if head_end < 0:
                break
            length = next((int(line.split(b":")[1]) for line in buf[offset:head_end].split(b"\r\n")
                           if line.lower().startswith(b"content-length")), None)
            if length is None or len(buf) < head_end + 4 + length + 2:
                break
            times.append(t)
            offset = head_end + 4 + length + 2
    return times, False


def error_code(body: bytes) -> str:
    """The `error` field of a JSON error body (or `?`)."""
    try:
        return str(json.loads(body).get("error", "?"))
    except (ValueError, AttributeError):
        return "?"


def speech_pcm(seconds: float = 3.0, silence_s: float = 1.0, sr: int = 16000) -> bytes:
    """Speech-like PCM16 (a syllable-modulated harmonic tone) followed by silence."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 6))
    voice = 0.2 * tone * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    audio = np.concatenate([voice, np.zeros(int(silence_s * sr))])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


class StreamSoak:
    """MJPEG and WebSocket clients side by side until `until` (monotonic)."""

    def __init__(self, args: argparse.Namespace, url: str):
        self.args, self.url = args, url
        self.headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        self.errors: dict[str, int] = defaultdict(int)
        self.clients: list[ClientStats] = []

    def error(self, what: str) -> None:
        self.errors[what] += 1

    async def mjpeg_client(self, index: int, until: float) -> None:
        """GET /generate streams back to back, each read to its end."""
        import httpx

        stats = ClientStats(f"mjpeg-{index}")
        self.clients.append(stats)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=60) as client:
            k = index
            while time.monotonic() < until:
                params = {"text": SENTENCES[k % len(SENTENCES)], "avatar": self.args.avatar}
                k += 1
                try:
                    async with client.stream("GET", "/generate", params=params) as r:
                        if r.status_code != 200:
                            await r.aread()
                            self.error(f"mjpeg http {r.status_code} {error_code(r.content)}")
                            await asyncio.sleep(1.0)
                            continue
                        chunks = [(time.monotonic(), c) async for c in r.aiter_raw()]
                    times, closed = mjpeg_frame_times(chunks)
                    stats.add_stream(times)
                    if not closed:
                        self.error("mjpeg stream without closing boundary")
                    elif len(times) != int(r.headers["x-frame-count"]):
                        self.error("mjpeg frame count differs from X-Frame-Count")
                except Exception as exc:  # counted, never fatal
                    self.error(f"mjpeg {type(exc).__name__}")
                    await asyncio.sleep(1.0)

    async def ws_client(self, index: int, until: float) -> None:
        """One /ws/live connection for the whole run (reconnecting after a failure), audio in real time."""
        import websockets

        stats = ClientStats(f"ws-{index}")
        self.clients.append(stats)
        url = self.url.replace("http", "ws", 1) + f"/ws/live?avatar={self.args.avatar}"
        if self.args.token:
            url += f"&access_token={self.args.token}"
        pcm, step = speech_pcm(), 640  # 20 ms chunks
        while time.monotonic() < until:
            times: list[float] = []
            try:
                async with websockets.connect(url, max_size=None) as ws:
                    if json.loads(await asyncio.wait_for(ws.recv(), 30)).get("type") != "ready":
                        self.error("ws no ready")
                    task = asyncio.create_task(self.ws_reader(ws, times))
                    start, sent = time.monotonic(), 0
                    while time.monotonic() < until and not task.done():
                        await ws.send(pcm[(sent * step) % len(pcm):][:step])
                        sent += 1
                        await asyncio.sleep(max(0.0, start + sent * 0.02 - time.monotonic()))
                    if task.done():
                        await task  # re-raises what ended the reader
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                if ws.close_code not in (None, 1000):
                    self.error(f"ws closed {ws.close_code}")
            except Exception as exc:  # counted, never fatal
                self.error(f"ws {type(exc).__name__}")
                await asyncio.sleep(1.0)
            stats.add_stream(times)

    async def ws_reader(self, ws, times: list[float]) -> None:
        """Record each frame's arrival time; count error events."""
        async for msg in ws:
            if isinstance(msg, bytes):
                times.append(time.monotonic())
            elif (event := json.loads(msg)).get("type") == "error":
                self.error(f"ws error event {event.get('error')}")

    async def warm_up(self) -> None:
        """Synthesise the sentences once (the TTS cache then serves them: the soak measures streams, not
        the TTS pool's refusals when eight clients start at once)."""
        import httpx

        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=120) as client:
            for text in SENTENCES:
                r = await client.get("/get-tts-audio", params={"text": text})
                if r.status_code != 200:
                    self.error(f"warm-up http {r.status_code} {error_code(r.content)}")

    async def run(self) -> dict:
        await self.warm_up()
        until = time.monotonic() + 60 * self.args.minutes
        await asyncio.gather(*(self.mjpeg_client(i, until) for i in range(self.args.mjpeg)),
                             *(self.ws_client(i, until) for i in range(self.args.ws)))
        clients = [c.summary() for c in self.clients]
        return {"mode": "streams", "minutes": self.args.minutes, "avatar": self.args.avatar,
                "mjpeg_clients": self.args.mjpeg, "ws_clients": self.args.ws,
                "errors": sum(self.errors.values()), "error_kinds": dict(self.errors),
                "fps_min": min((c["fps"] for c in clients), default=0.0),
                "gap_p95_ms_max": max((c["gap_p95_ms"] for c in clients), default=0.0), "clients": clients}


class Sampler:
    """VmRSS and threads of process `pid`, sampled every second in a thread."""

    def __init__(self, pid: int | None):
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while self.pid and not self.stop.is_set():
            try:
                self.samples.append(process_sample(self.pid))
            except OSError:
                return
            self.stop.wait(1.0)

    def report(self, warmup_s: float) -> dict:
        """RSS at start (after `warmup_s`: models, TTS voice and caches loaded), at the end, the largest,
        and the growth in between; threads at start and end."""
        if not self.samples:
            return {}
        start = self.samples[min(int(warmup_s), len(self.samples) - 1)]
        first, last = start["rss_kb"], self.samples[-1]["rss_kb"]
        return {"rss_mb_launch": round(self.samples[0]["rss_kb"] / 1024, 1), "warmup_s": round(warmup_s, 1),
                "rss_mb_start": round(first / 1024, 1), "rss_mb_end": round(last / 1024, 1),
                "rss_mb_max": round(max(s["rss_kb"] for s in self.samples) / 1024, 1),
                "rss_growth_pct": round(100.0 * (last - first) / first, 2),
                "threads_start": start["threads"], "threads_end": self.samples[-1]["threads"]}


@contextmanager
def served(avatar: str, streams: int) -> Iterator[tuple[str, int]]:
    """`api.py --avatar AVATAR` on a free port, admitting `streams` streams (`server.max_streams`, so the
    soak measures the clients it asks for rather than the admission's refusals), log in a temp file;
    yields its URL and pid."""
    import tempfile

    import httpx

    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "api.py"), "--port", str(port), "--avatar", avatar,
                                 "--log-level", "warning"], cwd=REPO, stdout=log, stderr=log,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", SYNCTALK_SERVER__MAX_STREAMS=str(streams)))
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
            while time.time() < deadline:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited:\n{log.read().decode(errors='replace')[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            stop_process(proc, 15)


def run_streams(args: argparse.Namespace) -> dict:
    """The streams mode against `--url` (or a server of its own with `--serve`)."""
    def soak(url: str, pid: int | None) -> dict:
        sampler = Sampler(pid)
        sampler.thread.start()
        try:
            report = asyncio.run(StreamSoak(args, url).run())
        finally:
            sampler.stop.set()
            sampler.thread.join()
        return {**report, "server": sampler.report(min(30.0, 12.0 * args.minutes))}

    if args.serve:
        with served(args.avatar, args.mjpeg + args.ws) as (url, pid):
            return soak(url, pid)
    return soak(args.url, args.pid)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(run_streams(args) if args.mode == "streams" else Soak(args).run(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
