"""Can the toy LLM learn to answer the closest-marker question from its depth block, in a given answer format and
number of steps? A learnability probe for issue 16, minutes per format on one CPU thread.

    python tools/toy/probe_chain.py --formats letter band scan --steps 1500          (about 5 min a format)
    python tools/toy/probe_chain.py --formats scan --context-noise 0.5

It trains the toy recipe's language model (transformers' Qwen2, 128 wide, 4 layers, from scratch, AdamW at the
recipe's learning rate and schedule) on sequences laid out as the toy world's (a question, the image after it, the
depth block, the answer), with two idealisations that leave only the answer's circuit to learn:

* the image: each of the 8 x 8 cells is embedded by a learned linear map of "which letter's marker is here, if any"
  (one-hot) plus Gaussian noise, standing in for a vision tower that has learnt to see the discs;
* the depth block: a smooth random nearness map, coded as K = 32 codes ordered by nearness (the depth_order
  initialisation's ideal), its levels 0-9 as the toy world's (preprocess/scenes/tasks.py).

Markers lie in the band rows, each in its own cell, the nearest strictly nearest by level, 3-5 of them. Formats:
``letter`` "(C)"; ``band`` the band's markers and every cell's level, then "(C)"; ``scan`` the toy world's scan step
(tasks.scan_rows), then "(C)". Only the answer is trained (the depth block is given). It prints, per format, the
greedy answer's accuracy after the true codes and after random codes, and the teacher-forced accuracy of the step's
characters. Results and what they decided: README, the toy world, seventh round.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from perceptio_dist.experiments.toy.marker_step import LEVEL_SYMBOLS, band_rows, scan_rows
from perceptio_dist.preprocess.scenes.tasks import LETTERS, PointRules

GRID, CODES, QUESTION_TOKENS = 8, 32, 20
FORMATS = ("letter", "band", "scan")
ROWS = band_rows(PointRules(grid=GRID))
BAND = [r * GRID + c for r in ROWS for c in range(GRID)]
SYMBOLS = ["question", "image", "image_start", "image_end", "depth_start", "depth_end", "(", ")", "|", "-",
           *LETTERS, *LEVEL_SYMBOLS]
TOKEN = {name: CODES + i for i, name in enumerate(SYMBOLS)}  # ids 0..K-1 are the depth codes
VOCAB = CODES + len(SYMBOLS)
IMAGE_AT = QUESTION_TOKENS + 1  # the first image token
DEPTH_AT = IMAGE_AT + GRID * GRID + 2  # the first depth code


def draw_scene(gen: torch.Generator, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Codes and levels of a smooth random nearness map (row-major), marker cells in the band, the nearest's index."""
    rows, cols = torch.meshgrid(torch.arange(GRID).float(), torch.arange(GRID).float(), indexing="ij")
    near = 0.5 * rows / (GRID - 1) * torch.rand(1, generator=gen)
    for _ in range(3):
        cy, cx = torch.rand(2, generator=gen) * GRID
        near = near + torch.rand(1, generator=gen) * torch.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 4)
    near = ((near - near.min()) / (near.max() - near.min() + 1e-9)).flatten()
    codes, levels = (near * CODES).long().clamp(max=CODES - 1), (near * 10).long().clamp(max=9)
    for _ in range(50):
        count = counts[int(torch.randint(len(counts), (1,), generator=gen))]
        cells = [BAND[int(i)] for i in torch.randperm(len(BAND), generator=gen)[:count]]
        marker_levels = levels[cells]
        nearest = int(marker_levels.argmax())
        if int((marker_levels == marker_levels[nearest]).sum()) == 1:
            return codes, levels, cells, nearest
    return draw_scene(gen, counts)


def answer_tokens(fmt: str, levels: torch.Tensor, cells: list[int], nearest: int) -> list[int]:
    marker_at = {cell: LETTERS[i] for i, cell in enumerate(cells)}
    step = ""
    if fmt == "band":
        step = "".join(marker_at.get(c, "-") for c in BAND) + "|" + "".join(LEVEL_SYMBOLS[levels[c]] for c in BAND) + "|"
    elif fmt == "scan":
        readout = [(c // GRID, c % GRID, int(levels[c])) for c in cells]
        step = "|".join(scan_rows(readout, ROWS, GRID)) + "|"
    return [TOKEN[ch] for ch in step] + [TOKEN["("], TOKEN[LETTERS[nearest]], TOKEN[")"]]


def make_batch(gen: torch.Generator, size: int, fmt: str, counts: list[int], noise: float):
    """Token ids, labels (answer tokens only), which letter is in each cell (0: none), the nearest letters."""
    ids, labels, markers, nearest_letters = [], [], [], []
    for _ in range(size):
        codes, levels, cells, nearest = draw_scene(gen, counts)
        if noise > 0:
            flip = torch.rand(GRID * GRID, generator=gen) < noise
            codes = torch.where(flip, torch.randint(0, CODES, (GRID * GRID,), generator=gen), codes)
        prefix = [TOKEN["question"]] * QUESTION_TOKENS + [TOKEN["image_start"]] + [TOKEN["image"]] * GRID * GRID + \
            [TOKEN["image_end"], TOKEN["depth_start"]] + codes.tolist() + [TOKEN["depth_end"]]
        answer = answer_tokens(fmt, levels, cells, nearest)
        ids.append(prefix + answer)
        labels.append([-100] * (len(prefix) - 1) + answer + [-100])  # position t predicts token t + 1
        marker = torch.zeros(GRID * GRID, dtype=torch.long)
        marker[cells] = torch.arange(1, len(cells) + 1)
        markers.append(marker)
        nearest_letters.append(TOKEN[LETTERS[nearest]])
    width = max(map(len, ids))  # answers differ in length only in the letter format's count (none here)
    assert all(len(row) == width for row in ids), "every answer of a format has one length"
    return torch.tensor(ids), torch.tensor(labels), torch.stack(markers), torch.tensor(nearest_letters)


class Probe(torch.nn.Module):
    def __init__(self, image_noise: float):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.llm = Qwen2ForCausalLM(Qwen2Config(  # the toy recipe's text model (recipes/toy_spatial.yaml)
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, max_position_embeddings=512, tie_word_embeddings=False))
        self.image = torch.nn.Linear(len(LETTERS) + 1 + 16, 128)
        self.image_noise = image_noise

    def embed(self, ids: torch.Tensor, markers: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        features = torch.cat([F.one_hot(markers, len(LETTERS) + 1).float(),
                              self.image_noise * torch.randn(*markers.shape, 16, generator=gen)], -1)
        embeds = self.llm.model.embed_tokens(ids).clone()
        embeds[:, IMAGE_AT:IMAGE_AT + GRID * GRID] = self.image(features)
        return embeds


@torch.no_grad()
def evaluate(probe: Probe, fmt: str, counts: list[int], items: int, random_codes: bool) -> tuple[float, float]:
    """Greedy answers' accuracy (the letter after "("), and the teacher-forced accuracy of the step's characters."""
    gen = torch.Generator().manual_seed(10_000)
    ids, labels, markers, nearest = make_batch(gen, items, fmt, counts, 0.0)
    if random_codes:
        ids[:, DEPTH_AT:DEPTH_AT + GRID * GRID] = torch.randint(0, CODES, (items, GRID * GRID), generator=gen)
    probe.eval()
    logits = probe.llm(inputs_embeds=probe.embed(ids, markers, torch.Generator().manual_seed(1))).logits
    step = labels.clone()
    step[:, -4:] = -100  # "(", the letter and ")" are not the step
    mask = step != -100
    step_accuracy = float((logits.argmax(-1)[mask] == step[mask]).float().mean()) if mask.any() else float("nan")
    prefix = DEPTH_AT + GRID * GRID + 1
    embeds = probe.embed(ids[:, :prefix], markers, torch.Generator().manual_seed(1))
    out = probe.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=ids.shape[1] - prefix, do_sample=False, pad_token_id=0)
    right = 0
    for answer, letter in zip(out.tolist(), nearest.tolist()):
        at = answer.index(TOKEN["("]) if TOKEN["("] in answer else None
        right += at is not None and at + 1 < len(answer) and answer[at + 1] == letter
    probe.train()
    return right / items, step_accuracy


def train(fmt: str, args) -> dict:
    torch.manual_seed(args.seed)
    probe = Probe(args.image_noise)
    opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, floor = 50, 0.1  # the toy recipe's train.warmup_steps and train.min_lr_ratio

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen, start = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        ids, labels, markers, _ = make_batch(gen, args.batch, fmt, args.counts, args.context_noise)
        logits = probe.llm(inputs_embeds=probe.embed(ids, markers, gen)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {fmt} step {step + 1}: loss {loss.item():.3f}, greedy accuracy "
                  f"{evaluate(probe, fmt, args.counts, 100, False)[0]:.2f}", flush=True)
    own, step_own = evaluate(probe, fmt, args.counts, args.eval_items, False)
    shuffled, step_random = evaluate(probe, fmt, args.counts, args.eval_items, True)
    return {"format": fmt, "own": own, "random": shuffled, "step_own": step_own, "step_random": step_random,
            "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8, help="samples a step (the toy recipe's 2 ranks x 4)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--context-noise", type=float, default=0.0, help="as data.depth_context_noise, in training")
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 4, 5], help="markers a question may have")
    parser.add_argument("--image-noise", type=float, default=0.5)
    parser.add_argument("--eval-items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.eval_items < 1:
        parser.error("--steps, --batch and --eval-items must be positive")
    if any(not 2 <= n <= len(LETTERS) for n in args.counts):
        parser.error(f"--counts must lie in 2..{len(LETTERS)}")
    torch.set_num_threads(args.threads)
    rows = [train(fmt, args) for fmt in args.formats]
    print(f"\n{args.steps} steps of {args.batch}, context noise {args.context_noise}, {args.counts} markers, "
          f"{args.eval_items} held-out items; chance {sum(1 / n for n in args.counts) / len(args.counts):.2f}")
    print("| format | accuracy, true codes | accuracy, random codes | step characters right, true / random codes | s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['format']} | {r['own']:.2f} | {r['random']:.2f} | {r['step_own']:.2f} / {r['step_random']:.2f} | "
              f"{r['seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
