"""One reader per source format.

Each reader module has ``NAME``, ``detect(row) -> bool`` (does one parsed row look like this
format) and ``read(row, opts)``, which returns a :class:`~reward_data.schema.Pair`, or for formats
where one row holds many comparisons a list of pairs and per-pair :class:`RowError` s; a
row-level problem raises :class:`~reward_data.schema.RowError`. A reader may also have
``resolved(row, opts) -> dict``: the options its defaults resolve to for a file (recorded in the
manifest and shown by ``rlhf data show``), raising ValueError when the file cannot be read as
configured (e.g. a ``label_field`` that is not a column). ``EXAMPLE`` is one typical row (shown
by ``rlhf data ingest --help``), with ``EXAMPLE_FLAGS`` where the format needs flags.
"""

from __future__ import annotations

from reward_data.readers import (arena, explicit, generic, hh, implicit, oasst, openai, ranked, rated, scored, sharegpt,
                                  shp, summarize, two_response, unpaired)

#: Format name -> reader module, in detection order.
READERS = {
    m.NAME: m for m in (explicit, implicit, hh, summarize, shp, oasst, two_response, rated, scored, arena, ranked,
                        sharegpt, openai, unpaired, generic)
}
