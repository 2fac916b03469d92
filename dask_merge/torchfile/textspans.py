"""Many short strings of one buffer, decoded in one call.

The names of a zip directory and the ids of a feature file are thousands of
short UTF-8 strings at known places.  Decoding each is a Python call; here
their bytes are gathered with a NUL after each and decoded at once, then
split.  Decoding stops before the first string that holds a NUL itself or
does not decode: the caller takes that one on its own, and names it if it
is at fault.
"""

from __future__ import annotations

import numpy as np


def decode_spans(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray, *,
                 errors: str = "strict") -> list[str]:
    """The UTF-8 strings ``raw[starts[i] : starts[i] + lengths[i]]`` up to the first odd one (see above).

    A NUL ends every UTF-8 sequence, so the joined bytes decode exactly as
    far as the strings do one by one.

    >>> raw = np.frombuffer(b"..abc.de..\\xff.", np.uint8)
    >>> decode_spans(raw, np.array([2, 6, 0]), np.array([3, 2, 0]))
    ['abc', 'de', '']
    >>> decode_spans(raw, np.array([2, 10, 6]), np.array([3, 1, 2]))  # not UTF-8
    ['abc']
    >>> decode_spans(raw[:1] * 0, np.array([0]), np.array([1]))  # a NUL
    []
    """
    if not len(starts):
        return []
    spans = lengths.astype(np.int64) + 1
    stops = np.cumsum(spans)  # where each string's NUL ends, in the joined bytes
    at = np.arange(stops[-1]) + np.repeat(starts.astype(np.int64) - (stops - spans), spans)
    joined = raw[np.minimum(at, len(raw) - 1)]  # the NUL after the last may lie past the end
    nul = joined == 0
    nul[stops - 1] = False  # the separators' places
    inner = np.flatnonzero(nul)
    joined[stops - 1] = 0
    count = int(np.searchsorted(stops, inner[0], "right")) if len(inner) else len(starts)
    text = joined[: stops[count - 1] - 1 if count else 0].tobytes()
    try:
        decoded = str(text, "utf-8", errors)
    except UnicodeDecodeError as err:
        count = int(np.searchsorted(stops, err.start, "right"))
        decoded = str(text[: stops[count - 1] - 1 if count else 0], "utf-8", errors)
    return decoded.split("\0") if count else []
