"""`Mp4Sink`: a Pipecat processor that writes the pictures and audio reaching it to an mp4 file (H.264
yuv420p at 25 fps + AAC, PyAV), in place of a transport: scripts and tests get the avatar's reply as a
file they can play or check.

Timeline: the n-th picture is video frame n (40 ms each, whatever the arrival times); audio that arrives
after picture n starts no earlier than n x 40 ms (silence fills a gap), so audio pushed right after its
picture (as `SyncTalkAvatar` does) lands exactly under it. The audio is written at the pipeline's output
rate (`StartFrame.audio_out_sample_rate`); other rates are resampled.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from synctalk.timing import FPS

AAC_FRAME = 1024


class Mp4Sink(FrameProcessor):
    """Write `OutputImageRawFrame`s and `OutputAudioRawFrame`s to `path` (mp4), passing every frame on."""

    def __init__(self, path: str | Path, crf: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.crf = int(crf)
        self.rate = 0
        self.frames = 0  # pictures written
        self.samples = 0  # audio samples written (the audio cursor)
        self._container: av.container.OutputContainer | None = None
        self._video = None
        self._audio = None
        self._size: tuple[int, int] = (0, 0)
        self._fifo = np.zeros(0, np.int16)
        self._fifo_pts = 0
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self._early_audio: list[OutputAudioRawFrame] = []

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Take the pipeline's output audio rate (the rate the file's audio is written at)."""
        await super().setup(setup)
        self.rate = int(setup.audio_out_sample_rate)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record media frames; close the file on End/Cancel; pass everything on."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, OutputImageRawFrame):
                self._write_image(frame)
            elif isinstance(frame, OutputAudioRawFrame):
                self._write_audio(frame)
            elif isinstance(frame, (EndFrame, CancelFrame)):
                self.close()
        await self.push_frame(frame, direction)

    # -- writing ------------------------------------------------------------------------------------

    def _open(self, width: int, height: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._size = (width - width % 2, height - height % 2)  # yuv420p needs even sides
        self._container = av.open(str(self.path), "w", format="mp4")
        video = self._container.add_stream("libx264", rate=FPS)
        video.width, video.height = self._size
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, FPS)
        video.options = {"crf": str(self.crf), "preset": "veryfast"}
        audio = self._container.add_stream("aac", rate=self.rate or 24000)
        audio.layout = "mono"
        self.rate = audio.codec_context.sample_rate
        self._video, self._audio = video, audio
        logger.info(f"{self}: writing {self.path} ({width}x{height}, audio {self.rate} Hz)")

    def _write_image(self, frame: OutputImageRawFrame) -> None:
        width, height = frame.size
        if self._container is None:
            self._open(width, height)
            for early in self._early_audio:
                self._write_audio(early)
            self._early_audio.clear()
        fmt = {"RGB": "rgb24", "RGBA": "rgba", "BGR": "bgr24"}.get(frame.format or "RGB", "rgb24")
        channels = 4 if fmt == "rgba" else 3
        pixels = np.frombuffer(frame.image, np.uint8).reshape(height, width, channels)
        w, h = self._size
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:h, :w]), format=fmt)
        vf.pts = self.frames
        self.frames += 1
        self._container.mux(self._video.encode(vf))  # type: ignore[union-attr]

    def _write_audio(self, frame: OutputAudioRawFrame) -> None:
        if self._container is None:
            self._early_audio.append(frame)
            return
        pcm = np.frombuffer(frame.audio, dtype="<i2")
        if frame.num_channels > 1:
            pcm = pcm[: len(pcm) - len(pcm) % frame.num_channels].reshape(-1, frame.num_channels).mean(axis=1)
        if frame.sample_rate != self.rate:
            stream = self._resamplers.setdefault(
                frame.sample_rate, soxr.ResampleStream(frame.sample_rate, self.rate, 1, dtype="int16"))
            pcm = stream.resample_chunk(np.asarray(pcm, np.int16))
        start = round(max(0, self.frames - 1) * self.rate / FPS)  # not before the picture it follows
        if start > self.samples:
            self._queue_audio(np.zeros(start - self.samples, np.int16))
        self._queue_audio(np.asarray(pcm, np.int16))

    def _queue_audio(self, pcm: np.ndarray) -> None:
        self.samples += len(pcm)
        self._fifo = np.concatenate([self._fifo, pcm])
        self._drain(partial=False)

    def _drain(self, partial: bool) -> None:
        while len(self._fifo) >= AAC_FRAME or (partial and len(self._fifo)):
            chunk, self._fifo = self._fifo[:AAC_FRAME], self._fifo[AAC_FRAME:]
            af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            af.sample_rate = self.rate
            af.pts = self._fifo_pts
            af.time_base = Fraction(1, self.rate)
            self._fifo_pts += len(chunk)
            self._container.mux(self._audio.encode(af))  # type: ignore[union-attr]

    def close(self) -> None:
        """Pad the audio to the video's length, flush both encoders and close the file."""
        if self._container is None:
            return
        end = round(self.frames * self.rate / FPS)
        if end > self.samples:
            self._queue_audio(np.zeros(end - self.samples, np.int16))
        self._drain(partial=True)
        self._container.mux(self._audio.encode(None))  # type: ignore[union-attr]
        self._container.mux(self._video.encode(None))  # type: ignore[union-attr]
        self._container.close()
        self._container = None
        logger.info(f"{self}: wrote {self.path}: {self.frames} frames, {self.samples / self.rate:.2f} s of audio "
                    f"({os.path.getsize(self.path)} bytes)")
