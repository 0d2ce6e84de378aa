"""Wall displays: kiosk pages pushed live from the room store, and command-driven signs."""

from .render import PageOptions
from .server import DisplayService
from .signs import SignDriver

__all__ = ["DisplayService", "PageOptions", "SignDriver"]
