"""SyncTalk_2D avatar for Pipecat: `SyncTalkAvatar` (TTS audio in, lip-synced video and re-timed audio
out) and `Mp4Sink` (write what reaches it to an H.264 + AAC file)."""
from synctalk_pipecat.processor import AvatarEventFrame, SyncTalkAvatar, load_engine
from synctalk_pipecat.sink import Mp4Sink

__all__ = ["AvatarEventFrame", "Mp4Sink", "SyncTalkAvatar", "load_engine"]
