"""Live detection: tags and sound events on a stream as it arrives, with a bounded delay (`LiveDetector`)."""

from .detector import LiveDetector, LiveUpdate

__all__ = ["LiveDetector", "LiveUpdate"]
