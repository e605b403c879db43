"""Face landmarks for preprocessing: mediapipe 0.10.21 face mesh (478 points, bundled model) in tracking
mode, with up to two faces so a second person in the picture is noticed.

`FaceTracker` takes an RGB image (usually a downscaled copy of the frame) and returns every face's 478
landmarks in the pixel coordinates of the full frame: mediapipe's coordinates are normalised to the image,
so they scale back exactly. It also picks the main face (the one nearest the previous main face, the
largest on the first frame). Temporal smoothing of the box-defining landmarks lives in
`face_crop.BoxTracker`, shared with the dataset readers.
"""
from __future__ import annotations

import logging
import os
import select
import sys
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from synctalk import face as face_crop

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ start-up warnings
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

NUM_POINTS = 478
EYE_OUTER_L, EYE_OUTER_R = 33, 263  # outer eye corners (image left / right for a frontal face)
NOSE_TIP = 4
QUIET_START = True  # filter mediapipe's native start-up banners from stderr (False when debugging mediapipe)


@dataclass
class Faces:
    """Faces found in one frame: `points` float64 `[F, 478, 2]` full-frame pixels, `main` the index of
    the main face (-1 when none)."""

    points: np.ndarray
    main: int

    @property
    def count(self) -> int:
        return int(self.points.shape[0])

    @property
    def main_points(self) -> np.ndarray | None:
        return None if self.main < 0 else self.points[self.main]


def face_width(points: np.ndarray) -> float:
    """Cheek-to-cheek distance (points 234-454) in pixels."""
    a, b = points[face_crop.MP_CHEEK_LEFT], points[face_crop.MP_CHEEK_RIGHT]
    return float(np.hypot(*(b[:2] - a[:2])))


def head_pose(points: np.ndarray) -> tuple[float, float]:
    """(roll in degrees, yaw proxy) of one face. Roll: angle of the outer-eye-corner line (positive =
    clockwise in the image). Yaw proxy: where the nose tip sits between the cheeks, minus 0.5 (0 =
    frontal, +-0.5 = profile)."""
    l, r = points[EYE_OUTER_L], points[EYE_OUTER_R]
    roll = float(np.degrees(np.arctan2(r[1] - l[1], r[0] - l[0])))
    cl, cr = points[face_crop.MP_CHEEK_LEFT, 0], points[face_crop.MP_CHEEK_RIGHT, 0]
    span = cr - cl
    yaw = float((points[NOSE_TIP, 0] - cl) / span - 0.5) if abs(span) > 1e-6 else 0.0
    return roll, yaw


class _StderrFilter:
    """Route file descriptor 2 through a pipe and drop mediapipe's native start-up banners from it.

    TFLite and absl print "Created TensorFlow Lite XNNPACK delegate", "All log messages before
    absl::InitializeLog()" and a few W0000 lines from C++ threads straight to fd 2, at moments that
    depend on thread timing. Everything else (Python logging, tqdm, other native output) is forwarded
    unchanged and at once. Active from the face mesh's construction until `close`."""

    DROP = (b"Created TensorFlow Lite XNNPACK delegate", b"All log messages before absl::InitializeLog()",
            b"inference_feedback_manager.cc", b"landmark_projection_calculator.cc")

    def __init__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="stderr-filter", daemon=True)
        self._thread.start()

    def _pump(self, fd: int) -> None:
        pending = b""  # an unfinished line: held up to 50 ms so a banner written in pieces is whole
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05 if pending else None)
            if not ready:
                self._emit(pending)
                pending = b""
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data = pending + chunk
            cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # tqdm ends its updates with \r
            self._emit(data[:cut])
            pending = data[cut:]
        self._emit(pending)
        os.close(fd)

    def _emit(self, data: bytes) -> None:
        if any(p in data for p in self.DROP):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not any(p in line for p in self.DROP))
        if data:
            os.write(self._saved, data)

    def close(self) -> None:
        """Restore fd 2 (which closes the pipe) and wait for the last forwarded bytes."""
        if self._saved < 0:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        self._thread.join(timeout=5)
        os.close(self._saved)
        self._saved = -1


class FaceTracker:
    """mediapipe face mesh in tracking mode (`static_image_mode=False`, `refine_landmarks=True`).

    max_faces: 2 (default) detects a second face; with 2 the face detector keeps running while only
    one face is tracked, which costs about 1 ms per frame."""

    def __init__(self, max_faces: int = 2, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5):
        import mediapipe as mp  # optional heavy dependency: only the landmark stages need it

        self._filter = _StderrFilter() if QUIET_START else None
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=max_faces, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence, min_tracking_confidence=min_tracking_confidence)
        self._last_centre: np.ndarray | None = None

    def __call__(self, rgb: np.ndarray, frame_w: int, frame_h: int) -> Faces:
        """Faces in `rgb` (uint8 `[h, w, 3]`, any scale of the `frame_w` x `frame_h` frame)."""
        result = self._mesh.process(rgb)
        found = result.multi_face_landmarks or []
        if not found:
            return Faces(np.zeros((0, NUM_POINTS, 2)), -1)
        pts = np.empty((len(found), NUM_POINTS, 2), dtype=np.float64)
        for k, face in enumerate(found):
            lm = face.landmark
            n = min(len(lm), NUM_POINTS)
            pts[k, :n] = [(p.x, p.y) for p in lm][:n]
            if n < NUM_POINTS:  # refine_landmarks off would give 468; never with our settings
                pts[k, n:] = pts[k, n - 1]
        pts[..., 0] *= frame_w
        pts[..., 1] *= frame_h
        centres = pts.mean(axis=1)
        if self._last_centre is None or len(found) == 1:
            main = int(np.argmax([face_width(p) for p in pts])) if len(found) > 1 else 0
        else:
            main = int(np.argmin(np.hypot(*(centres - self._last_centre).T)))
        self._last_centre = centres[main]
        return Faces(pts, main)

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
        if self._filter is not None:
            self._filter.close()
            self._filter = None

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LandmarkError(RuntimeError):
    """mediapipe is missing or cannot start."""


class FaceMesh:
    """mediapipe 0.10.21 face mesh in static-image mode (no tracking, so no smoothing hides jitter):
    BGR frame -> `[478, 2]` pixels, NaN when no face is found. Used by evaluation and training
    validation; preprocessing uses the tracking `FaceTracker`."""

    def __init__(self, min_detection_confidence: float = 0.3):
        try:
            import mediapipe as mp  # optional at import: only the landmark metrics need it
        except ImportError as exc:  # pragma: no cover - mediapipe is a runtime dependency
            raise LandmarkError(f"mediapipe is needed for the landmark metrics: {exc}") from None
        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                     refine_landmarks=True,
                                                     min_detection_confidence=min_detection_confidence)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        res = self._mesh.process(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if not res.multi_face_landmarks:
            return np.full((NUM_POINTS, 2), np.nan)
        pts = res.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h) for p in pts], dtype=np.float64)

    def close(self) -> None:
        self._mesh.close()
