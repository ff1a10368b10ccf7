"""JSON for the hot path: ``orjson`` when installed, the standard library otherwise.

Both paths produce byte-identical output for the canonical records (compact separators, no
ASCII escaping, the same escapes for control characters), so a dataset's content hash does not
depend on whether orjson is installed; ``tests/unit/reward_data`` checks this.
"""

from __future__ import annotations

import json
from typing import Any

try:  # optional speed-up (about 5x on loads and dumps)
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None

_std_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def std_dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON via the standard library (UnicodeEncodeError on lone surrogates)."""
    return _std_encode(obj).encode("utf-8")


if orjson is not None:
    fast_loads = orjson.loads
    _orjson_dumps = orjson.dumps
    _OrjsonError = orjson.JSONEncodeError

    def dumps(obj: Any) -> bytes:
        """Compact UTF-8 JSON; raises UnicodeEncodeError for text that is not valid Unicode."""
        try:
            return _orjson_dumps(obj)
        except _OrjsonError:
            # orjson refuses lone surrogates (and ints over 64 bits); the stdlib path gives the
            # same bytes where encoding is possible and the precise UnicodeEncodeError where not.
            return std_dumps(obj)
else:
    fast_loads = None
    dumps = std_dumps
