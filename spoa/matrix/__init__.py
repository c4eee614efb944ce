"""Matrix request parsing: access tokens, users, rooms, X-Matrix origins.

Every function here takes what HAProxy sends (raw, undecoded strings, or
None when absent) and returns a canonical value or None. None of them
raises on any input: malformed input gives None, and the caller falls back
to the documented key.
"""

from .query import query_value
from .rooms import room_from_path
from .tokens import access_token, syt_localpart
from .xmatrix import xmatrix_origin

__all__ = ["access_token", "query_value", "room_from_path", "syt_localpart", "xmatrix_origin"]
