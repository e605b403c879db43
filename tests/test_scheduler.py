"""The per-engine frame scheduler (synctalk/scheduler.py): shared batches render exactly what a
stream would get alone, streams really share batches, cancellation and deadlines."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import REPO

from synctalk.avatar import latest_checkpoint
from synctalk.engine import LipSyncEngine
from synctalk.scheduler import FrameScheduler


@pytest.fixture(scope="module")
def engine(fixture_avatar):
    a = fixture_avatar
    return LipSyncEngine.load(a.dataset_dir, a.checkpoint_path, backend="onnx", device="cpu", batch_size=8,
                              threads=1)


@pytest.fixture(scope="module")
def features(fixture_avatar):
    return np.load(fixture_avatar.dataset_dir / "aud_whisper.npy")


def stream_inputs(engine, features, start: int, n: int, source_start: int):
    """Audio windows of output frames start..start+n on source frames walking from `source_start`."""
    windows = engine.audio_windows(features, range(start, start + n))
    order = engine.frame_order(n, start_frame=source_start)
    return windows, order


def test_frames_rendered_in_shared_batches_equal_frames_rendered_alone(engine, features):
    streams = [stream_inputs(engine, features, 10 * s, 3 + s, 7 * s) for s in range(4)]
    alone = [engine.render(w, o) for w, o in streams]
    sched = FrameScheduler(engine, max_batch=8, max_wait_s=0.2)
    try:
        results: list = [None] * len(streams)

        def client(i: int) -> None:
            results[i] = sched.render(*streams[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sched.stats.frames == sum(len(o) for _, o in streams)
        assert sched.stats.batches < len(streams)  # the streams shared batches (3+4+5+6 frames in <= 3)
        for got, want in zip(results, alone):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
    finally:
        sched.close()


def test_earliest_deadline_first_and_cancelled_requests_are_never_rendered(engine, features):
    sched = FrameScheduler(engine, max_batch=2, max_wait_s=0.0)
    try:
        w, o = stream_inputs(engine, features, 0, 6, 0)
        now = time.monotonic()
        busy = sched.submit(w, o, deadline=now)  # occupies the worker for three batches
        late = sched.submit(w[:2], o[:2], deadline=now + 10.0)
        gone = sched.submit(w[:2], o[:2], deadline=now + 5.0)
        urgent = sched.submit(w[:2], o[:2], deadline=now + 1.0)
        assert gone.cancel()
        order = []
        for name, fut in (("late", late), ("urgent", urgent), ("busy", busy)):
            fut.add_done_callback(lambda f, name=name: order.append((name, time.monotonic())))
        busy.result(60), urgent.result(60), late.result(60)
        assert [name for name, _ in sorted(order, key=lambda x: x[1])].index("urgent") < \
            [name for name, _ in sorted(order, key=lambda x: x[1])].index("late")
        assert sched.stats.cancelled == 1 and sched.stats.frames == 10
    finally:
        sched.close()


def test_crops_mode_and_bad_input(engine, features):
    sched = FrameScheduler(engine)
    try:
        w, o = stream_inputs(engine, features, 5, 3, 2)
        crops = sched.submit(w, o, paste=False).result(60)
        np.testing.assert_array_equal(np.stack(crops), engine.render_crops(w, o))
        assert sched.submit(w[:0], o[:0]).result(1) == []
        with pytest.raises(ValueError, match="2 audio windows for 3 frames"):
            sched.submit(w[:2], o)
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(w, o)


def test_finish_runs_on_each_frame_in_the_bounded_paste_pool(engine, features):
    """`finish` (the MJPEG streams' JPEG encoder) sees every pasted frame, in order, on a paste-pool
    thread, never in the caller's; with batching off it runs in the caller's thread."""
    w, o = stream_inputs(engine, features, 3, 5, 1)
    want = engine.render(w, o)
    seen: list[str] = []

    def finish(frame: np.ndarray) -> int:
        seen.append(threading.current_thread().name)
        return int(frame.astype(np.int64).sum())

    for batching, pool in ((True, True), (False, False)):
        seen.clear()
        sched = FrameScheduler(engine, paste_workers=2, batching=batching)
        try:
            got = sched.render(w, o, finish=finish)
        finally:
            sched.close()
        assert got == [int(f.astype(np.int64).sum()) for f in want]
        assert len(seen) == len(o)
        assert all(name.startswith("paste") for name in seen) == pool
        assert all(name == threading.current_thread().name for name in seen) == (not pool)
    with pytest.raises(ValueError, match="paste=True"):
        FrameScheduler(engine, batching=False).submit(w, o, paste=False, finish=finish)


@pytest.fixture(scope="module")
def demo_engine():
    """The bundled demo avatar's engine (no training needed)."""
    demo = REPO / "demo_avatar"
    ckpt = latest_checkpoint(demo / "checkpoint" / "demo")
    assert ckpt is not None, "demo_avatar/ has no checkpoint"
    return LipSyncEngine.load(demo / "dataset" / "demo", ckpt[0], backend="onnx",
                              device="cpu", batch_size=8, threads=1)


def test_without_batching_each_request_renders_alone_in_the_callers_thread(demo_engine):
    features = np.random.default_rng(0).random((20, 2, 384), dtype=np.float32)
    windows, order = demo_engine.audio_windows(features, range(10)), demo_engine.frame_order(10)
    before = {t.ident for t in threading.enumerate()}
    sched = FrameScheduler(demo_engine, batching=False)
    assert {t.ident for t in threading.enumerate()} == before  # no worker thread, no paste pool
    future = sched.submit(windows, order)
    assert future.done()  # rendered in this thread before submit returned
    for got, want in zip(future.result(), demo_engine.render(windows, order)):
        np.testing.assert_array_equal(got, want)
    crops = sched.submit(windows[:3], order[:3], paste=False).result(0)
    np.testing.assert_array_equal(np.stack(crops), demo_engine.render_crops(windows[:3], order[:3]))
    assert (sched.stats.requests, sched.stats.frames, sched.stats.batches) == (2, 13, 3)  # the engine's 8 + 2, 3
    sched.close()
    with pytest.raises(RuntimeError, match="closed"):
        sched.submit(windows, order)


# ----------------------------------------------------------------------------------------------
# Whisper windows batched across live streams


def test_live_streams_share_whisper_calls_and_get_the_features_they_would_get_alone(engine):
    """Three streams push their speech at once through the scheduler's feature encoder: each gets the
    rows it gets encoding alone (up to float rounding), and the encoder ran fewer calls than streams asked."""
    from synctalk.features import StreamingFeatures

    rng = np.random.default_rng(5)
    audio = [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in range(3)]
    alone = [StreamingFeatures(config=engine.feature_config).process_file(a) for a in audio]
    sched = FrameScheduler(engine, max_wait_s=0.2)
    try:
        encode = sched.feature_encoder()
        streams = [StreamingFeatures(config=engine.feature_config, encode=encode) for _ in audio]
        got: list = [None] * 3
        start = threading.Barrier(3)

        def push(k: int) -> None:
            start.wait()
            got[k] = np.concatenate([streams[k].push(audio[k]), streams[k].flush()])

        threads = [threading.Thread(target=push, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = sched.snapshot()["features"]
    finally:
        sched.close()
    for mine, ref in zip(got, alone):
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    assert stats["requests"] >= 3 and stats["calls"] < stats["requests"], stats
    assert FrameScheduler(engine, batching=False).feature_encoder() is None  # the baseline encodes alone


def test_a_failing_feature_call_fails_its_streams_and_the_batcher_keeps_serving():
    from synctalk.scheduler import WindowBatcher

    def encode(windows: np.ndarray) -> np.ndarray:
        if (windows < 0).any():
            raise ValueError("bad window")
        return np.repeat(windows[:, :1], 2, axis=0)  # two rows per window

    batcher = WindowBatcher(encode, max_batch=4, max_wait_s=0.0)
    try:
        with pytest.raises(ValueError, match="bad window"):
            batcher.encode(-np.ones((1, 8), np.float32))
        np.testing.assert_array_equal(batcher.encode(np.arange(16, dtype=np.float32).reshape(2, 8))[:, 0],
                                      [0, 0, 8, 8])
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.encode(np.zeros((1, 8), np.float32))
