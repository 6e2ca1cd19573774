"""The one base of every error drb-uring raises on purpose.

The CLI turns any :class:`DrbError` into a single line (``drb: error: ...``)
and a non-zero exit; anything else reaching it is a bug and keeps its
traceback.
"""

from __future__ import annotations


class DrbError(Exception):
    """An error with a message meant for the person running drb."""
