"""Live detection: tags and sound events on a stream as it arrives, with a bounded delay (`LiveDetector`)."""

from .detector import READ_SECONDS, LiveDetector, LiveUpdate

__all__ = ["READ_SECONDS", "LiveDetector", "LiveUpdate"]
