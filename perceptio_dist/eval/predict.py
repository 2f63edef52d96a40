"""Generation over the evaluation items: which parts of the spatial chain each task's answers carry, the global
batches the ranks share, and the answers."""

from __future__ import annotations

from .benchmarks import EvalItem
from .generate import GenerationSettings, Prediction, SpatialPolicy, generate

# The training task whose answers an evaluation task's answers look like.
TRAINING_TASK = {"relative_depth": "relative_depth", "referring_seg": "referring_seg", "multiple_choice": "vqa"}


def decoding_policy(task: str, chain: dict | None, depth_tokens: bool, depth_policy: str) -> SpatialPolicy:
    """Force the parts of the chain the task's training answers carried (chain.json of the export), forbid the
    others; ``depth_policy`` other than 'auto' overrides the depth block. Without a recorded chain: [SEG] for
    referring, the depth block for relative depth when the model was trained with depth tokens."""
    trained = (chain or {}).get(TRAINING_TASK[task])
    if trained is None:
        trained = {"seg": "force" if task == "referring_seg" else "forbid",
                   "depth": "force" if task == "relative_depth" and depth_tokens else "forbid"}
    return SpatialPolicy(seg=trained["seg"], depth=trained["depth"] if depth_policy == "auto" else depth_policy)


def plan_batches(items: list[EvalItem], batch_size: int) -> list[list[int]]:
    """Global batches of item indices, each of one task (one decoding policy). Ranks take whole batches,
    so a batch (and its padding) is the same whatever the rank count, and so are the results."""
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    return [idx[s:s + batch_size] for idx in by_task.values() for s in range(0, len(idx), batch_size)]


def predict(model, tokenizer, builder, items: list[EvalItem], batches: list[list[int]], depth_tokens: bool,
            depth_policy: str, settings: GenerationSettings, progress: bool,
            chain: dict | None = None) -> dict[int, Prediction]:
    from tqdm import tqdm

    out: dict[int, Prediction] = {}
    with tqdm(total=sum(map(len, batches)), desc="eval", unit="item", disable=not progress) as bar:
        for chunk in batches:
            prompts, pixels, sam, sizes = generation_inputs(tokenizer, builder, items, chunk)
            policy = decoding_policy(items[chunk[0]].task, chain, depth_tokens, depth_policy)
            for i, prediction in zip(chunk, generate(model, tokenizer, prompts, pixels, sam, sizes, policy, settings)):
                out[i] = prediction
            bar.update(len(chunk))
    return out


def generation_inputs(tokenizer, builder, items: list[EvalItem], chunk: list[int]):
    """Prompts (up to the assistant header), tiles, SAM2 images and image sizes of a batch of items."""
    from ..data.conversation import encode_prompt
    from ..data.images import resize_normalised, to_tensor

    prompts, pixels, sam, sizes = [], [], [], []
    for i in chunk:
        item = items[i]
        tiles = builder.tiles(item.image)
        prompts.append(encode_prompt(tokenizer, builder.image_tokens, tiles.shape[0], item.question))
        pixels.append(tiles)
        sam.append(resize_normalised(to_tensor(item.image), builder.geo.sam_size))
        sizes.append(item.image.shape[:2])
    return prompts, pixels, sam, sizes
