"""One reader per source format.

Each reader module has ``NAME``, ``detect(row) -> bool`` (does one parsed row look like this
format) and ``read(row, opts)``, which returns a :class:`~reward_data.schema.Pair`, or for formats
where one row holds many comparisons a list of pairs and per-pair :class:`RowError` s; a
row-level problem raises :class:`~reward_data.schema.RowError`.
"""

from __future__ import annotations

from reward_data.readers import explicit, generic, hh, implicit, oasst, rated, shp, summarize, two_response

#: Format name -> reader module, in detection order.
READERS = {
    m.NAME: m for m in (explicit, implicit, hh, summarize, shp, oasst, two_response, rated, generic)
}
