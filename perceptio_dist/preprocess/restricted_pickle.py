"""Reading pickles from untrusted files: plain containers and scalars only.

The refer toolkit ships its RefCOCO annotations as a pickle of dicts, lists, strings and numbers.
A normal ``pickle.load`` would run any code the file names; this unpickler refuses every global
(class or function reference) but one pure bytes decoder, which is all plain data needs.
"""

from __future__ import annotations

import io
import pickle


# The only global plain data needs: protocol-2 pickles written by Python 3 encode bytes as
# _codecs.encode(text, "latin1"), a pure function.
ALLOWED = {("_codecs", "encode")}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only plain containers and scalars are allowed in this pickle"
        )


def load_plain_pickle(data: bytes):
    """Unpickle ``data`` allowing only dict/list/tuple/set/str/bytes/int/float/bool/None."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
