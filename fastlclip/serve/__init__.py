"""The batching Latent-CLIP reward server: ``python -m fastlclip.serve`` (see ``__main__``), or
``create_app(reward)`` for any ASGI server. Needs the ``serve`` extra (uvicorn, starlette, prometheus_client)."""

from .app import create_app
from .batcher import Batcher, QueueFull
from .protocol import PROTOCOL_VERSION, ProtocolError, ScoreRequest, parse, read_metadata

__all__ = ["Batcher", "PROTOCOL_VERSION", "ProtocolError", "QueueFull", "ScoreRequest", "create_app", "parse",
           "read_metadata"]
