"""Dovetail wire protocol: message definitions, framing codec and feature packing.

Import as ``dovetail.protocol``. Numpy only (no torch), so every process can
load it cheaply.
"""
from . import codec, errors, features, messages, validation
from .codec import *  # noqa: F401,F403
from .errors import *  # noqa: F401,F403
from .features import *  # noqa: F401,F403
from .messages import *  # noqa: F401,F403
from .validation import *  # noqa: F401,F403

__all__ = [*messages.__all__, *errors.__all__, *codec.__all__, *validation.__all__,
           *features.__all__]
