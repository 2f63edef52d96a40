"""Reading pickles from untrusted files: plain containers and scalars only.

The refer toolkit ships its RefCOCO annotations as a pickle of dicts, lists, strings and numbers.
A normal ``pickle.load`` would run any code the file names; this unpickler refuses every global
(class or function reference), which plain data never needs.
"""

from __future__ import annotations

import io
import pickle


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain containers and scalars are allowed in this pickle"
        )


def load_plain_pickle(data: bytes):
    """Unpickle ``data`` allowing only dict/list/tuple/set/str/bytes/int/float/bool/None."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
