"""More sessions per process: admission control (503 + Retry-After, WebSocket 1013), start-up
calibration, avatars loaded on demand and evicted past the memory budget, and streams rendering through
the avatar's shared frame scheduler."""
from __future__ import annotations

import gc
import json
import shutil
import threading

import httpx
import numpy as np
import pytest
import websockets.sync.client as ws_client
from test_api import LiveServer, audio_file, build_app, make_settings

from services import admission
from services.admission import Admission, calibrate
from services.generator import EnhancedFrameGenerationService
from services.models import ModelService


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_admission_counts_places_by_kind_and_refuses_past_capacity():
    adm = Admission(capacity=2)
    assert adm.try_acquire("mjpeg") and adm.try_acquire("live")
    assert not adm.try_acquire("mjpeg")
    adm.release("live")
    assert adm.try_acquire("webrtc")
    assert adm.status() == {"capacity": 2, "active": 2, "by_kind": {"mjpeg": 1, "live": 0, "webrtc": 1},
                            "refused": 1, "measured_fps": None}
    unlimited = Admission()
    assert all(unlimited.try_acquire("mjpeg") for _ in range(50))


def test_calibration_measures_the_real_pipeline(fixture_avatar, tmp_path):
    models = ModelService(make_settings(fixture_avatar, tmp_path))
    scheduler = models.scheduler(fixture_avatar.name)
    streams, fps = calibrate(EnhancedFrameGenerationService(scheduler.engine, jpeg_quality=85, scheduler=scheduler))
    assert fps > 1.0 and streams == max(1, int(0.9 * fps / 25))
    assert scheduler.stats.frames >= 3 * 50  # three rounds of 2 s of calibration audio went through the scheduler
    models.unload(fixture_avatar.name)


def test_calibration_keeps_the_best_round(monkeypatch):
    rounds = iter([40.0, 125.0, 96.0])  # a slow first round (one-time costs), then the machine's pace
    monkeypatch.setattr(admission, "calibration_round", lambda generator, parallel: next(rounds))
    assert calibrate(None, 2) == (4, 125.0)  # 0.9 x 125 / 25 = 4.5 streams


@pytest.fixture(scope="module")
def full_server(fixture_avatar, tmp_path_factory):
    """A server that holds one stream at a time."""
    cfg = make_settings(fixture_avatar, tmp_path_factory.mktemp("density"), max_streams=1)
    app, services = build_app(cfg)
    with LiveServer(app) as server:
        server.services = services
        yield server


def test_a_stream_past_capacity_gets_503_with_retry_after_and_the_place_comes_back(full_server):
    upload = {"audio_file": ("a.wav", audio_file("WAV", 4.0), "audio/wav")}
    with httpx.Client(base_url=full_server.url, timeout=120) as client:
        with client.stream("POST", "/generate-from-audio", files=upload) as first:
            assert first.status_code == 200
            parts = first.iter_raw()  # keep the iterator: closing it would end the stream
            next(parts)  # streaming: its place is taken
            busy = client.post("/generate-from-audio", files=upload)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
            assert busy.json()["error"] == "busy" and "capacity of 1" in busy.json()["detail"]
            text = client.get("/generate", params={"text": "Hello there."})
            assert text.status_code == 503  # refused before any synthesis
            with ws_client.connect(full_server.url.replace("http", "ws") + "/ws/live", open_timeout=30) as ws:
                event = json.loads(ws.recv(timeout=30))
                assert event["type"] == "error" and event["error"] == "busy"
                with pytest.raises(Exception):
                    ws.recv(timeout=30)
                assert ws.close_code == 1013
            for _ in parts:  # read the first stream to its end: its place comes back
                pass
        health = client.get("/health").json()
        assert health["admission"]["refused"] == 3 and health["admission"]["capacity"] == 1
        assert health["admission"]["active"] == 0  # the finished stream gave its place back
        again = client.post("/generate-from-audio", files=upload)
        assert again.status_code == 200
        sched = next(a for a in health["avatars"] if a["loaded"])["scheduler"]
        assert sched["frames"] >= 100  # the stream rendered through the avatar's scheduler


def test_avatars_load_on_demand_evict_past_the_budget_and_reload_identically(fixture_avatar, tmp_path):
    # two avatars: the fixture and a copy of it under another name
    datasets, checkpoints = tmp_path / "dataset", tmp_path / "checkpoint"
    for name in ("first", "second"):
        shutil.copytree(fixture_avatar.dataset_dir, datasets / name, ignore=shutil.ignore_patterns("*.mp4"))
        (checkpoints / name).mkdir(parents=True)
        shutil.copy(fixture_avatar.checkpoint_path, checkpoints / name / "1.pth")
    cfg = make_settings(fixture_avatar, tmp_path)
    cfg.paths.dataset_root, cfg.paths.checkpoint_root = datasets, checkpoints
    models = ModelService(cfg)
    first = models.engine("first")
    windows = first.audio_windows(np.load(datasets / "first" / "aud_whisper.npy"), range(4))
    before = [f.copy() for f in models.scheduler("first").render(windows, [0, 1, 2, 3])]
    one = first.memory_bytes()
    del first
    cfg.models.memory_budget_mb = max(64, int(1.5 * one / 2**20))  # room for one avatar, not two
    gc.collect()
    base = rss_bytes()
    models.engine("second")
    status = models.status()
    assert status["loaded"] == ["second"] and status["evictions"] == 1  # loading "second" evicted "first"
    assert models.unload("second")
    gc.collect()
    assert rss_bytes() <= 1.10 * base  # memory returns after unloading
    again = models.scheduler("first").render(windows, [0, 1, 2, 3])
    for a, b in zip(before, again):
        np.testing.assert_array_equal(a, b)
    status = models.status()
    assert status["loaded"] == ["first"] and status["memory_mb"] > 0


def test_a_new_avatar_dropped_into_the_folder_is_found_without_a_restart(fixture_avatar, tmp_path):
    datasets, checkpoints = tmp_path / "dataset", tmp_path / "checkpoint"
    datasets.mkdir()
    cfg = make_settings(fixture_avatar, tmp_path)
    cfg.paths.dataset_root, cfg.paths.checkpoint_root = datasets, checkpoints
    models = ModelService(cfg)
    assert models.names() == []
    shutil.copytree(fixture_avatar.dataset_dir, datasets / "late", ignore=shutil.ignore_patterns("*.mp4"))
    (checkpoints / "late").mkdir(parents=True)
    shutil.copy(fixture_avatar.checkpoint_path, checkpoints / "late" / "2.pth")
    models._last_scan = 0.0  # the rescan interval has passed
    assert models.resolve("late").epoch == 2


def test_concurrent_streams_share_the_schedulers_batches(fixture_avatar, tmp_path):
    models = ModelService(make_settings(fixture_avatar, tmp_path))
    scheduler = models.scheduler(fixture_avatar.name)
    service = EnhancedFrameGenerationService(scheduler.engine, jpeg_quality=80, scheduler=scheduler)
    alone = EnhancedFrameGenerationService(scheduler.engine, jpeg_quality=80)
    audio = np.load(fixture_avatar.dataset_dir / "aud_whisper.npy")  # only for its length
    rng = np.random.default_rng(1)
    clips = [(0.1 * rng.standard_normal(16000 * 2)).astype(np.float32) for _ in range(3)]
    assert len(audio) > 0
    results: list = [None] * len(clips)

    def run(i: int) -> None:
        job, out = service.job(clips[i]), []
        while (batch := job.next_batch()) is not None:
            out.extend(batch)
        results[i] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert scheduler.stats.mean_batch > 1.0
    for clip, got in zip(clips, results):
        job, want = alone.job(clip), []
        while (batch := job.next_batch()) is not None:
            want.extend(batch)
        assert got == want  # the same JPEG bytes with and without sharing
    models.unload(fixture_avatar.name)
