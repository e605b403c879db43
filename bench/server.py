"""Concurrent streams per process: the frame scheduler against one stream at a time, on one avatar.

    python bench/server.py [--streams 1 2 4 6 8] [--kinds text upload live] [--seconds 8]
                           [--avatar demo] [--max_streams 0] [--device auto] [--threads 1]
                           [--batch_size 8] [--table] [--quick]

Two `python api.py` processes on the same avatar (default: the bundled demo, the small model), started
one after the other (each calibrates alone) and then both up, idle while the other is measured:
  - baseline:  `SYNCTALK_SERVER__BATCHING=false`: every stream renders alone on the engine, one stream's
               batch at a time (what `FrameGenerationService` does without a scheduler);
  - scheduler: the server as shipped: the avatar's `FrameScheduler` batches frames across its streams.
Both run the real admission control: the capacity calibrated at start-up (or `--max_streams`); past it a
stream is refused (HTTP 503 `busy`, WebSocket close 1013). One short stream of each kind warms each
server up first (one-time costs). Then for each kind and level N clients start at once, on the
baseline and right after on the scheduler (both engines see the same machine):
  - text:   GET /generate of one sentence of about `--seconds` of speech (synthesised once before the
            levels: every stream is a TTS cache hit, so the benchmark measures streams, not the TTS pool);
  - upload: POST /generate-from-audio, `--seconds` of speech as WAV (../shared/media/audio/musetalk_eng.wav
            from 0.2 s before its first voiced frame, else the sentence's TTS audio);
  - live:   WS /ws/live with frame events; the same speech sent in 20 ms chunks in real time (each chunk
            when its last sample would have been captured), then `stop`; the client stays for the
            announced latency + 0.5 s.
Per stream: first-frame latency (MJPEG: request sent -> first JPEG part; live: the chunk holding the end of
the first speech frame's audio sent -> that frame received), delivered fps (frames / seconds between the
first and the last; live: over the speech stretch, first to last speech frame), frames dropped and
repeated (MJPEG: parts against `X-Frame-Count`; live: frame numbers missing from, or received twice in,
the speech stretch). Per level: streams served and refused, fps min / median and latency p50 / p95 over
the served streams, CPU (server process cores, share of all cores busy, this client's cores) and the
scheduler's mean U-Net batch. One JSON object on stdout (schema in docs/deployment.md); `--table` adds a
markdown table on stderr. `--quick` is a smoke run of seconds (1 and 2 streams, 1 s of speech).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import fixtures  # bench/fixtures.py (sibling)
import httpx
import numpy as np
from common import free_port, stop_process  # bench/common.py
from soak import error_code, mjpeg_frame_times  # bench/soak.py: the MJPEG part parser, error bodies

from synctalk import audio as audio_io
from synctalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

REPO = Path(__file__).resolve().parents[1]

ENGINES = (("baseline", False), ("scheduler", True))  # name, server.batching
KINDS = ("text", "upload", "live")
GOAL_STREAMS, GOAL_FPS, GOAL_LATENCY_RATIO, GOAL_OVERLOAD_FPS = 4, 24.0, 1.5, 20.0
CHUNK_SAMPLES = SAMPLE_RATE // 50  # 20 ms of live audio per message
PARAGRAPH = ("Streaming lip sync should start quickly and keep pace with the voice while other people are "
             "talking to the same avatar at the same time, so every stream shares the machine fairly and "
             "nobody waits for a frame that should already be on the screen. The server batches the mouths "
             "of all its streams into one network call and refuses a stream it cannot serve in real time.")
WORDS_PER_SECOND = 2.6  # about the bundled Piper voice's pace


# ----------------------------------------------------------------------------------------------
# Server process and CPU


class Server:
    """`python api.py` on a free port, its log in a temp file. With `root`, the bench avatar built there
    (bench/fixtures.py's `make_avatar`); with None, the avatars the configuration finds. `env` adds
    settings (`SYNCTALK_*`)."""

    def __init__(self, root: Path | None, threads: int, batch: int, avatar: str = "bench", device: str = "cpu",
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        paths = {} if root is None else {
            "SYNCTALK_PATHS__DATASET_ROOT": str(root / "dataset"),
            "SYNCTALK_PATHS__CHECKPOINT_ROOT": str(root / "checkpoint"),
            "SYNCTALK_PATHS__DEMO_ROOT": str(root / "no-demo")}
        self.env = dict(os.environ, **paths, SYNCTALK_MODELS__DEVICE=device, SYNCTALK_MODELS__THREADS=str(threads),
                        SYNCTALK_MODELS__BATCH_SIZE=str(batch), SYNCTALK_MODELS__BACKEND="onnx",
                        OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **(env or {}))
        self.avatar = avatar
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "api.py"), "--port", str(self.port), "--avatar", self.avatar,
             "--log-level", "warning"], env=self.env, cwd=REPO, stdout=self.log, stderr=self.log)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.__exit__()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            try:
                if self.health().get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.__exit__()
        raise RuntimeError(f"server did not become ready:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)
        self.log.close()

    def health(self) -> dict:
        """GET /health."""
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid` so far, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def system_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (None elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


class CpuMeter:
    """CPU use between its creation and `report()`: the server's, the whole machine's and this client's."""

    def __init__(self, pid: int):
        self.pid, self.wall = pid, time.monotonic()
        self.server, self.system = process_cpu_s(pid), system_cpu()
        self.client = sum(os.times()[:2])

    def report(self) -> dict:
        """server_cores, system_busy (share of all cores), client_cores, loadavg_1m."""
        wall = max(time.monotonic() - self.wall, 1e-6)
        server, system = process_cpu_s(self.pid), system_cpu()
        out: dict = {"server_cores": None, "system_busy": None,
                     "client_cores": round((sum(os.times()[:2]) - self.client) / wall, 2),
                     "loadavg_1m": round(os.getloadavg()[0], 2)}
        if server is not None and self.server is not None:
            out["server_cores"] = round((server - self.server) / wall, 2)
        if system is not None and self.system is not None and system[1] > self.system[1]:
            out["system_busy"] = round((system[0] - self.system[0]) / (system[1] - self.system[1]), 3)
        return out


# ----------------------------------------------------------------------------------------------
# What the clients send


@dataclass
class Media:
    """The same speech for every stream: the sentence (text), its WAV (upload) and PCM16 (live)."""

    text: str
    wav: bytes
    pcm: bytes
    seconds: float
    source: str


def speech_text(seconds: float) -> str:
    """A sentence of about `seconds` of speech."""
    words = PARAGRAPH.split()
    n = max(3, round(seconds * WORDS_PER_SECOND))
    return " ".join((words * (n // len(words) + 1))[:n]).rstrip(",.") + "."


def first_voiced_frame(audio16k: np.ndarray) -> int:
    """Index of the first 40 ms frame whose RMS exceeds 10% of the loudest frame's."""
    n = len(audio16k) // SAMPLES_PER_FRAME
    rms = np.sqrt((audio16k[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME) ** 2).mean(axis=1))
    return int(np.argmax(rms > 0.1 * rms.max()))


def speech_audio(text: str) -> tuple[np.ndarray, str]:
    """16 kHz speech: the shared recording when ../shared is present, else `text` through the
    configured TTS chain (the bundled Piper voice)."""
    path = fixtures.default_audio()
    if path is not None:
        return audio_io.load_audio(str(path), sr=SAMPLE_RATE), path.name
    from config import settings
    from services.tts import build_tts

    return build_tts(settings).synthesize(text).to_16k().astype(np.float32), "tts"


def prepare_media(seconds: float) -> Media:
    """`seconds` of speech from 0.2 s before its first voiced frame (looped when shorter)."""
    text = speech_text(seconds)
    audio, source = speech_audio(text)
    start = max(0, first_voiced_frame(audio) - 5) * SAMPLES_PER_FRAME
    n = int(seconds * SAMPLE_RATE)
    clip = np.resize(audio[start:], n).astype(np.float32)  # np.resize repeats a short clip
    pcm = (np.clip(clip, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return Media(text, audio_io.wav_bytes(clip, SAMPLE_RATE), pcm, seconds, source)


# ----------------------------------------------------------------------------------------------
# One stream


@dataclass
class StreamResult:
    """What one client saw: `status` is ok, refused (503 busy / close 1013) or what went wrong."""

    status: str
    first_frame_s: float | None = None
    fps: float | None = None
    frames: int = 0
    dropped: int = 0
    repeated: int = 0


def refusal(channel: str, error: str) -> StreamResult:
    """A stream the server did not serve: refused by admission (`busy`), or another error."""
    return StreamResult("refused" if error == "busy" else f"{channel} {error}")


async def mjpeg_stream(client: httpx.AsyncClient, kind: str, media: Media) -> StreamResult:
    """One text or upload MJPEG stream, read to its end."""
    if kind == "text":
        request = client.build_request("GET", "/generate", params={"text": media.text})
    else:
        request = client.build_request("POST", "/generate-from-audio",
                                       files={"audio_file": ("speech.wav", media.wav, "audio/wav")})
    start = time.monotonic()
    response = await client.send(request, stream=True)
    try:
        if response.status_code != 200:
            return refusal(f"http {response.status_code}", error_code(await response.aread()))
        chunks = [(time.monotonic(), c) async for c in response.aiter_raw()]
    finally:
        await response.aclose()
    times, closed = mjpeg_frame_times(chunks)
    if not times or not closed:
        return StreamResult("incomplete stream", frames=len(times))
    expected = int(response.headers["x-frame-count"])
    span = times[-1] - times[0]
    return StreamResult("ok", times[0] - start, (len(times) - 1) / span if span > 0 else None, len(times),
                        max(0, expected - len(times)), max(0, len(times) - expected))


async def send_realtime(ws, pcm: bytes) -> list[float]:
    """Send 20 ms chunks, each when its last sample would have been captured; their send times."""
    step, sent = 2 * CHUNK_SAMPLES, []
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK_SAMPLES / SAMPLE_RATE - time.monotonic()))
        await ws.send(pcm[offset: offset + step])
        sent.append(time.monotonic())
    return sent


async def read_live(ws, frames: list[tuple[float, int, str, float | None]]) -> None:
    """Record (arrival, frame number, state, audio time) of every frame announced by a frame event."""
    from websockets.exceptions import ConnectionClosed

    pending = None
    try:
        async for msg in ws:
            if isinstance(msg, bytes):
                if pending is not None:
                    frames.append((time.monotonic(), *pending))
                pending = None
            elif (event := json.loads(msg)).get("type") == "frame":
                pending = (int(event["frame"]), str(event["state"]), event.get("audio_time"))
    except ConnectionClosed:
        pass


def live_result(frames: list[tuple[float, int, str, float | None]], sent: list[float]) -> StreamResult:
    """Latency, fps, dropped and repeated frames over the speech stretch of one live stream."""
    speech = [f for f in frames if f[2] == "speech" and f[3] is not None]
    if not speech or not sent:
        return StreamResult("no speech frame", frames=len(frames))
    k0, k1 = speech[0][1], speech[-1][1]
    stretch = [f for f in frames if k0 <= f[1] <= k1]
    unique = len({f[1] for f in stretch})
    span = stretch[-1][0] - stretch[0][0]
    audio_end = round((float(speech[0][3] or 0.0) + 1 / FPS) * SAMPLE_RATE)  # the first speech frame's audio
    chunk = min(len(sent) - 1, max(0, math.ceil(audio_end / CHUNK_SAMPLES) - 1))
    return StreamResult("ok", speech[0][0] - sent[chunk], (len(stretch) - 1) / span if span > 0 else None,
                        len(stretch), (k1 - k0 + 1) - unique, len(stretch) - unique)


async def live_stream(url: str, media: Media) -> StreamResult:
    """One /ws/live connection: the speech in real time, then `stop`, then the tail of its frames."""
    import websockets

    async with websockets.connect(url.replace("http", "ws", 1) + "/ws/live", max_size=None, open_timeout=60) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if hello.get("type") != "ready":
            return refusal("ws", str(hello.get("error")))
        await ws.send(json.dumps({"type": "config", "frame_events": True}))
        frames: list[tuple[float, int, str, float | None]] = []
        reader = asyncio.create_task(read_live(ws, frames))
        sent = await send_realtime(ws, media.pcm)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.sleep(float(hello.get("latency_ms", 760)) / 1000 + 0.5)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return live_result(frames, sent)


async def one_stream(client: httpx.AsyncClient, url: str, kind: str, media: Media) -> StreamResult:
    """One stream of `kind`; an exception is a result, never fatal."""
    try:
        if kind == "live":
            return await live_stream(url, media)
        return await mjpeg_stream(client, kind, media)
    except Exception as exc:  # counted among the level's errors
        return StreamResult(type(exc).__name__)


# ----------------------------------------------------------------------------------------------
# Levels and engines


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None without values."""
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(results: list[StreamResult]) -> dict:
    """One level: streams served and refused, errors, fps min / median, first-frame p50 / p95, drops."""
    ok = [r for r in results if r.status == "ok"]
    fps = [r.fps for r in ok if r.fps is not None]
    latency = [r.first_frame_s for r in ok if r.first_frame_s is not None]
    errors = Counter(r.status for r in results if r.status not in ("ok", "refused"))
    return {"streams": len(results), "served": len(ok), "refused": sum(r.status == "refused" for r in results),
            "errors": dict(errors), "fps_min": round(min(fps), 2) if fps else None,
            "fps_median": round(statistics.median(fps), 2) if fps else None,
            "first_frame_p50_s": percentile(latency, 50), "first_frame_p95_s": percentile(latency, 95),
            "dropped": sum(r.dropped for r in ok), "repeated": sum(r.repeated for r in ok)}


def scheduler_counts(health: dict) -> tuple[int, int]:
    """(frames, batches) the loaded avatar's scheduler has rendered so far."""
    sched = next((a.get("scheduler") for a in health["avatars"] if a.get("loaded")), None) or {}
    return int(sched.get("frames", 0)), int(sched.get("batches", 0))


def wait_idle(server: Server, timeout: float = 30.0) -> None:
    """Until the previous level's streams have given their places back."""
    deadline = time.monotonic() + timeout
    while server.health()["admission"]["active"] and time.monotonic() < deadline:
        time.sleep(0.2)


async def run_streams(url: str, kind: str, n: int, media: Media) -> list[StreamResult]:
    """`n` streams of `kind` started at once."""
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n + 4)) as client:
        return list(await asyncio.gather(*(one_stream(client, url, kind, media) for _ in range(n))))


def measure_level(server: Server, kind: str, n: int, media: Media) -> dict:
    """One level: the streams, their summary, CPU and the mean U-Net batch meanwhile."""
    wait_idle(server)
    frames0, batches0 = scheduler_counts(server.health())
    assert server.proc is not None
    meter, start = CpuMeter(server.proc.pid), time.monotonic()
    results = asyncio.run(run_streams(server.url, kind, n, media))
    level = {**summarize(results), "seconds": round(time.monotonic() - start, 2), "cpu": meter.report()}
    frames1, batches1 = scheduler_counts(server.health())
    level["mean_batch"] = round((frames1 - frames0) / (batches1 - batches0), 2) if batches1 > batches0 else None
    return level


def warm_up(server: Server, media: Media, kinds: list[str]) -> dict:
    """The sentence into the TTS cache (its speech duration returned), then one short stream per kind,
    so the first level does not pay one-time costs."""
    r = httpx.get(f"{server.url}/get-tts-audio", params={"text": media.text}, timeout=300)
    r.raise_for_status()
    short = Media("Warm up.", audio_io.wav_bytes(audio_io.load_audio(media.wav)[:SAMPLE_RATE // 2]),
                  media.pcm[: SAMPLE_RATE], 0.5, media.source)
    for kind in kinds:
        asyncio.run(run_streams(server.url, kind, 1, short))
    return {"text_speech_seconds": float(r.headers.get("x-audio-duration", "nan"))}


def engine_server(args: argparse.Namespace, batching: bool) -> Server:
    """The server of one engine: `server.batching` = `batching`, the admission `--max_streams` sets."""
    env = {"SYNCTALK_SERVER__BATCHING": str(batching).lower(), "SYNCTALK_SERVER__MAX_STREAMS": str(args.max_streams)}
    return Server(None, args.threads, args.batch_size, avatar=args.avatar, device=args.device, env=env)


def engine_info(server: Server, batching: bool, media: Media, kinds: list[str]) -> dict:
    """What the server runs (checked against `batching`) and its admission; then the warm-up."""
    health = server.health()
    avatar = next(a for a in health["avatars"] if a.get("loaded"))
    if avatar["scheduler"]["batching"] is not batching:
        raise RuntimeError(f"the server reports batching={avatar['scheduler']['batching']}, expected {batching}")
    return {"batching": batching, "device": health["device"], "avatar": avatar["name"],
            "engine": avatar.get("engine", {}), "admission": health["admission"],
            **warm_up(server, media, kinds), "levels": {kind: {} for kind in kinds}}


def run_engines(args: argparse.Namespace, media: Media) -> dict:
    """Both servers up (started one after the other, so each calibrates alone); every kind and level
    measured on the baseline, then at once on the scheduler, so both see the same machine."""
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(engine_server(args, batching)) for name, batching in ENGINES}
        report = {name: engine_info(servers[name], batching, media, args.kinds) for name, batching in ENGINES}
        for kind in args.kinds:
            for n in args.streams:
                for name, server in servers.items():
                    report[name]["levels"][kind][str(n)] = level = measure_level(server, kind, n, media)
                    print(json.dumps({"engine": name, "kind": kind, "streams": n, **level}), file=sys.stderr)
        for name, server in servers.items():
            report[name]["admission"] = server.health()["admission"]
    return report


# ----------------------------------------------------------------------------------------------
# Ratios, goals, table


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    return round(a / b, 3) if a is not None and b else None


def same_run_ratios(base: dict, sched: dict) -> dict:
    """Scheduler over baseline per kind and level: served streams, fps min / median, p95 first frame."""
    out: dict = {}
    for kind, levels in sched.items():
        out[kind] = {n: {key: ratio(s[key], base[kind][n][key])
                         for key in ("served", "fps_min", "fps_median", "first_frame_p95_s")}
                     for n, s in levels.items()}
    return out


def streams_at_fps(levels: dict, fps: float) -> int:
    """The most streams of one kind all served at >= `fps` each (0 when none)."""
    good = [int(n) for n, lv in levels.items()
            if lv["served"] == lv["streams"] and lv["fps_min"] is not None and lv["fps_min"] >= fps]
    return max(good, default=0)


def latency_growth(levels: dict) -> float | None:
    """p95 first-frame latency at 4 streams over the single-stream figure (None when not measured)."""
    one, four = levels.get("1"), levels.get(str(GOAL_STREAMS))
    return ratio(four["first_frame_p95_s"], one["first_frame_p95_s"]) if one and four else None


def overload(levels: dict) -> dict | None:
    """At 8 streams: served, refused, the slowest served stream, and whether it kept >= 20 fps."""
    lv = levels.get("8")
    if lv is None:
        return None
    ok = lv["served"] > 0 and lv["fps_min"] is not None and lv["fps_min"] >= GOAL_OVERLOAD_FPS
    return {"served": lv["served"], "refused": lv["refused"], "fps_min": lv["fps_min"], "pass": ok}


def all_pass(values: list[bool | None]) -> bool | None:
    """True when every check passed, None when one was not measured, else False."""
    return None if any(v is None for v in values) else all(values)


def goals(base: dict, sched: dict) -> dict:
    """The issue's goals, judged on the scheduler; the baseline's figures alongside."""
    at24 = {e: {k: streams_at_fps(lv, GOAL_FPS) for k, lv in levels.items()} for e, levels in
            (("baseline", base), ("scheduler", sched))}
    measured4 = all(str(GOAL_STREAMS) in lv for lv in sched.values())
    growth = {e: {k: latency_growth(lv) for k, lv in levels.items()} for e, levels in
              (("baseline", base), ("scheduler", sched))}
    over = {e: {k: overload(lv) for k, lv in levels.items()} for e, levels in (("baseline", base), ("scheduler", sched))}
    return {
        "streams_at_24fps": {"target": GOAL_STREAMS, **at24, "pass": all_pass(
            [v >= GOAL_STREAMS if measured4 else None for v in at24["scheduler"].values()])},
        "first_frame_p95_4_over_1": {"target": GOAL_LATENCY_RATIO, **growth, "pass": all_pass(
            [None if v is None else v <= GOAL_LATENCY_RATIO for v in growth["scheduler"].values()])},
        "admission_at_8": {"min_fps": GOAL_OVERLOAD_FPS, **over, "pass": all_pass(
            [None if v is None else v["pass"] for v in over["scheduler"].values()])},
    }


def cell(level: dict, a: str, b: str, digits: int) -> str:
    """`a / b` of a level, '-' for a missing figure."""
    return " / ".join("-" if level[k] is None else f"{level[k]:.{digits}f}" for k in (a, b))


def markdown_table(report: dict) -> str:
    """Streams x fps x latency, baseline and scheduler, one row per kind and level."""
    rows = ["| kind | streams | served (refused), baseline / scheduler | fps min / median, baseline | "
            "fps min / median, scheduler | first frame p50 / p95 s, baseline | first frame p50 / p95 s, scheduler | "
            "server CPU cores, baseline / scheduler |", "|---|---|---|---|---|---|---|---|"]
    for kind, levels in report["scheduler"]["levels"].items():
        for n, s in levels.items():
            b = report["baseline"]["levels"][kind][n]
            cpu = " / ".join("-" if x["cpu"]["server_cores"] is None else str(x["cpu"]["server_cores"])
                             for x in (b, s))
            rows.append(f"| {kind} | {n} | {b['served']} ({b['refused']}) / {s['served']} ({s['refused']}) | "
                        f"{cell(b, 'fps_min', 'fps_median', 1)} | {cell(s, 'fps_min', 'fps_median', 1)} | "
                        f"{cell(b, 'first_frame_p50_s', 'first_frame_p95_s', 2)} | "
                        f"{cell(s, 'first_frame_p50_s', 'first_frame_p95_s', 2)} | {cpu} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 6, 8], help="concurrency levels")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--seconds", type=float, default=8.0, help="speech per stream (s)")
    p.add_argument("--avatar", default="demo", help="avatar the servers load (default %(default)s)")
    p.add_argument("--max_streams", type=int, default=0, help="server.max_streams (0: calibrated at start-up)")
    p.add_argument("--device", default="auto", help="models.device of the servers")
    p.add_argument("--threads", type=int, default=1, help="models.threads of the servers")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--table", action="store_true", help="also print a markdown table (stderr)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 streams, 1 s of speech")
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.seconds = [1, 2], 1.0
    if min(args.streams) < 1 or args.seconds < 0.5:
        p.error("--streams must be >= 1 and --seconds >= 0.5")
    args.streams = sorted(set(args.streams))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    media = prepare_media(args.seconds)
    report: dict = {"benchmark": "server concurrency", "quick": args.quick, "cpu_count": os.cpu_count(),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "config": {"avatar": args.avatar, "streams": args.streams, "kinds": args.kinds,
                               "seconds": args.seconds, "audio": media.source, "text_words": len(media.text.split()),
                               "max_streams": args.max_streams, "threads": args.threads,
                               "batch_size": args.batch_size}}
    report.update(run_engines(args, media))
    base, sched = report["baseline"]["levels"], report["scheduler"]["levels"]
    report["ratios"] = same_run_ratios(base, sched)
    report["goals"] = goals(base, sched)
    report["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(report, indent=1))
    if args.table:
        print(markdown_table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
