"""Conversation layout, the temporary synthetic source, collation and the rank/micro-batch index math."""

from __future__ import annotations

import pytest
import torch

from perceptio_dist.data import collate, iterate_micro_batches, micro_batch_indices
from perceptio_dist.data.conversation import ImageTokens, encode_conversation, spatial_answer_ids
from perceptio_dist.data.sources import build_source
from perceptio_dist.losses.objective import IGNORE_INDEX, find_depth_blocks
from perceptio_dist.model.spatial_tokens import add_spatial_tokens


@pytest.fixture
def ids(tiny_cfg, tiny_tokenizer):
    return add_spatial_tokens(tiny_tokenizer, tiny_cfg.model.tokens)


def test_spatial_chain_of_thought_layout(tiny_tokenizer, ids):
    image = ImageTokens("<img>", "<IMG_CONTEXT>", "</img>", per_tile=16)
    spatial = spatial_answer_ids(ids, with_seg=True, depth_codes=list(range(16)))
    input_ids, labels = encode_conversation(tiny_tokenizer, image, 1, "Segment the red box.", spatial, "Done.")
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((input_ids == context).sum()) == 16
    target = labels[labels != IGNORE_INDEX]
    # the assistant turn: [SEG], <DEPTH_START>, 16 codes, <DEPTH_END>, answer text, <|im_end|>
    assert target[0] == ids.seg and target[1] == ids.depth_start
    assert target[2:18].tolist() == [ids.code_start + c for c in range(16)]
    assert target[18] == ids.depth_end
    assert tiny_tokenizer.decode(target[19:]) == "Done.<|im_end|>"
    # everything before the assistant turn is ignored, including the image tokens
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    assert tiny_tokenizer.decode(input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert torch.equal(input_ids[first:], labels[first:])
    with pytest.raises(ValueError, match="N=16"):
        spatial_answer_ids(ids, with_seg=False, depth_codes=[1, 2])


def test_temporary_source_is_deterministic_and_well_formed(tiny_cfg, tiny_tokenizer, ids):
    source = build_source(tiny_cfg, tiny_tokenizer, ids, sam_image_size=128, image_tokens_per_tile=16)
    a, b = source[17], source[17]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sam_image, b.sam_image)
    kinds = set()
    for i in range(40):
        s = source[i]
        targets = s.labels[1:][s.labels[1:] != IGNORE_INDEX]
        blocks = find_depth_blocks(targets, ids)  # raises on a malformed block
        n_seg = int((s.input_ids == ids.seg).sum())
        assert s.seg_masks.shape == (n_seg, 128, 128) and s.teacher_depth.shape == (blocks.count, 1, 32, 32)
        assert set(s.seg_masks.unique().tolist()) <= {0.0, 1.0}
        if blocks.count:
            assert 0 <= float(s.teacher_depth.min()) and float(s.teacher_depth.max()) <= 1
        kinds.add((n_seg, blocks.count))
        assert s.input_ids.numel() <= tiny_cfg.data.max_seq_len
    assert kinds == {(0, 0), (0, 1), (1, 0), (1, 1)}  # every layout occurs


def test_collate_pads_and_keeps_spatial_targets_in_order(tiny_cfg, tiny_tokenizer, ids):
    source = build_source(tiny_cfg, tiny_tokenizer, ids, sam_image_size=128, image_tokens_per_tile=16)
    samples = [source[i] for i in range(5)]
    batch = collate(samples, tiny_tokenizer.pad_token_id)
    longest = max(s.input_ids.numel() for s in samples)
    assert batch.input_ids.shape == (5, longest)
    for row, s in enumerate(samples):
        n = s.input_ids.numel()
        assert batch.attention_mask[row].sum() == n
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
    assert batch.seg_masks.shape[0] == int((batch.input_ids == ids.seg).sum())
    torch.testing.assert_close(batch.seg_masks, torch.cat([s.seg_masks for s in samples]))
    assert batch.pixel_values.shape == (5, 3, 64, 64)


def test_micro_batch_indices_match_across_rank_counts():
    # one rank with accum 2 == two ranks with accum 1, for every step
    for step in range(3):
        one = [list(micro_batch_indices(step, m, 0, 1, 2, 2)) for m in range(2)]
        two = [list(micro_batch_indices(step, 0, r, 2, 2, 1)) for r in range(2)]
        assert one == two
    # every index is read exactly once across ranks and micro-batches
    seen = [i for step in range(4) for m in range(3) for r in range(2) for i in micro_batch_indices(step, m, r, 2, 5, 3)]
    assert sorted(seen) == list(range(4 * 3 * 2 * 5))
    with pytest.raises(ValueError):
        micro_batch_indices(0, 0, 2, 2, 1, 1)


def test_iterate_micro_batches_reads_the_rank_slice(tiny_cfg, tiny_tokenizer, ids):
    source = build_source(tiny_cfg, tiny_tokenizer, ids, sam_image_size=128, image_tokens_per_tile=16)
    it = iterate_micro_batches(source, tiny_tokenizer.pad_token_id, start_step=1, rank=1, world_size=2,
                               micro_batch_size=2, grad_accum=1)
    first = next(it)
    expected = collate([source[6], source[7]], tiny_tokenizer.pad_token_id)  # step 1 of global batch 4, rank 1
    assert torch.equal(first.input_ids, expected.input_ids)
