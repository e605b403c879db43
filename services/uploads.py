"""Audio uploads (multipart form field `audio_file`, alias `file`), shared by `/generate-from-audio` and
the WebRTC sessions' speak command: the size cap before parsing, the extension check, decoding to 16 kHz
mono with the duration limit, each failure a 4xx `APIError`."""
from __future__ import annotations

import logging
from pathlib import Path

import anyio
import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from services.errors import APIError
from synctalk.audio import AudioTooLong, load_audio

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a")
UPLOAD_FIELDS = ("audio_file", "file")
FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries on top of the file itself
LIMIT_SETTING = "server.max_audio_seconds"


def uploaded_file(form: FormData) -> UploadFile | None:
    """The form's audio file: the first of `UPLOAD_FIELDS` that holds a file."""
    for name in UPLOAD_FIELDS:
        value = form.get(name)
        if isinstance(value, UploadFile):
            return value
    return None


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded audio file's bytes and its extension; the size cap is enforced before parsing."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise APIError(411, "length_required", "the upload needs a Content-Length header")
    if int(length) > max_bytes + FORM_OVERHEAD:
        raise APIError(413, "upload_too_large", f"upload is {length} bytes, the limit is {max_bytes}")
    try:
        async with request.form(max_files=1, max_fields=8) as form:
            upload = uploaded_file(form)
            if upload is None:
                raise APIError(400, "missing_file", "send the audio as multipart form field 'audio_file'")
            extension = Path(upload.filename or "").suffix.lower()
            if extension not in AUDIO_EXTENSIONS:
                raise APIError(415, "unsupported_format",
                               f"unsupported audio file {extension or '(no extension)'}; "
                               f"send one of {', '.join(AUDIO_EXTENSIONS)}")
            data = await upload.read(max_bytes + 1)
    except APIError:
        raise
    except StarletteHTTPException as exc:  # Starlette's own 400 for a multipart body it cannot parse
        if exc.status_code != 400:
            raise
        raise APIError(400, "bad_form", f"cannot parse the multipart form: {exc.detail}") from None
    except Exception as exc:  # malformed multipart body
        raise APIError(400, "bad_form", f"cannot parse the multipart form: {exc}") from None
    if len(data) > max_bytes:
        raise APIError(413, "upload_too_large", f"upload is over the limit of {max_bytes} bytes")
    return data, extension


async def decode_upload(data: bytes, extension: str, max_seconds: float) -> np.ndarray:
    """16 kHz mono float32 audio of an uploaded file; 413 when it is longer than `max_seconds` (from the
    container's declared duration before decoding, else while decoding); 400 when it cannot be decoded."""

    try:
        audio = await anyio.to_thread.run_sync(lambda: load_audio(data, max_seconds=max_seconds))
    except AudioTooLong as exc:
        length = f"{exc.duration_s:.0f} s long" if exc.duration_s is not None else "longer than the limit"
        raise APIError(413, "audio_too_long", f"the {extension} file is {length}; the limit "
                                              f"({LIMIT_SETTING}) is {max_seconds:g} s") from None
    except Exception as exc:  # each decoder has its own error types; all mean "not valid audio"
        log.info("cannot decode %s upload: %s", extension, exc)
        raise APIError(400, "corrupt_audio", f"cannot decode the {extension} file: {exc}") from None
    if audio.size == 0:
        raise APIError(400, "corrupt_audio", f"the {extension} file holds no audio")
    return np.asarray(audio, dtype=np.float32)
