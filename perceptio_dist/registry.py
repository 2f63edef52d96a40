"""The core's extension points: named registries that experiments add to, and how experiments are found.

An experiment (``perceptio_dist/experiments/<name>/``, or any installed package) declares itself under the entry
point group ``perceptio_dist.experiments``; importing it registers its parts here. The core never imports an
experiment: a registry lookup loads the declared experiments once, so a recipe, shard set, checkpoint or export
that names an experiment's part finds it wherever it is read (training, preprocessing workers, evaluation).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")
EXPERIMENTS_GROUP = "perceptio_dist.experiments"
_loaded = False

def load_experiments() -> None:
    """Import every declared experiment once (each registers its parts on import)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=EXPERIMENTS_GROUP):
        entry.load()

class Registry(Generic[T]):
    """Named parts of one kind, e.g. answer formats; names are unique."""

    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, T] = {}

    def register(self, name: str, part: T) -> T:
        if name in self._parts and self._parts[name] is not part:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._parts[name] = part
        return part

    def __getitem__(self, name: str) -> T:
        load_experiments()
        if name not in self._parts:
            known = ", ".join(sorted(self._parts)) or "none"
            raise KeyError(f"no {self.kind} named {name!r} (registered: {known}); an experiment that provides it "
                           f"must be installed and declared under the entry point group {EXPERIMENTS_GROUP!r}")
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        load_experiments()
        return iter(sorted(self._parts))

    def items(self) -> list[tuple[str, T]]:
        load_experiments()
        return sorted(self._parts.items())

    def values(self) -> list[T]:
        return [part for _, part in self.items()]

# Answer formats of the synthetic relative-depth questions: written at preprocessing, read back at evaluation by
# the same part (preprocess/scenes/tasks.py's LetterAnswer shows what a part provides).
ANSWER_FORMATS: Registry = Registry("answer format")
# Per-group evaluation diagnostics beyond the core figures, each run only on the groups whose data has what it
# measures (eval/metrics.py says what a part provides).
EVAL_DIAGNOSTICS: Registry = Registry("evaluation diagnostic")
# Initialisers of a fresh model's parts (never of weights a checkpoint brings), in name order:
# ``initialise(model, backbone_cfg)`` on a random-weight InternVL (model/backbone.py) ...
BACKBONE_INITIALISERS: Registry = Registry("backbone initialiser")
# ... and ``initialise(backbone, vqvae, token_ids, model_cfg, seed)`` on the new spatial-token rows of the
# embedding and LM head (model/perceptio.py).
CODE_ROW_INITIALISERS: Registry = Registry("code-row initialiser")
# Options of the sample builder (data/training_data.py): ``configure(cfg, training, options)`` sets fields of a
# data.sample_builder.SampleOptions (where the image sits, transforms of a sample's input ids).
SAMPLE_OPTIONS: Registry = Registry("sample option")
