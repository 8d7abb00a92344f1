"""imcap.search.Bans: per-image banned sequences, as transformers' NoBadWordsLogitsProcessor bans them."""

import torch
from transformers.generation import NoBadWordsLogitsProcessor

from imcap.search import Bans

VOCAB = 12


def test_bans_mask_what_no_bad_words_masks_for_each_image():
    """One- to three-token sequences, several sharing their first tokens, on histories that end with
    their prefixes (and ones that do not): every row's mask is the processor's for its image alone."""
    per_image = [
        [[3], [1, 2], [1, 4], [5, 1, 2], [6, 1, 7]],
        [],
        [[2, 2], [9, 2, 2], [4, 4, 4]],
    ]
    bans = Bans(per_image, VOCAB)
    generator = torch.Generator().manual_seed(0)
    histories = torch.tensor(
        [[0, 5, 1], [0, 6, 1], [0, 0, 1], [0, 3, 5], [8, 9, 2], [0, 4, 4], [0, 1, 2], [0, 0, 2]]
    )
    images = torch.tensor([0, 0, 0, 0, 2, 2, 1, 2])
    scores = torch.randn(len(histories), VOCAB, generator=generator)
    got = bans.apply(histories, scores.clone(), images)
    for row, image in enumerate(images.tolist()):
        expected = scores[row : row + 1].clone()
        if per_image[image]:
            expected = NoBadWordsLogitsProcessor(per_image[image], eos_token_id=11)(
                histories[row : row + 1], expected
            )
        assert torch.equal(got[row], expected[0]), row
    assert got[0, [3, 2, 4]].isinf().all() and got[1, 7].isinf() and not got[2, 7].isinf()


def test_a_subset_keeps_each_images_bans():
    bans = Bans([[[1]], [[2, 3]], [[4]]], VOCAB)
    subset = bans.subset([2, 1])
    scores = subset.apply(torch.tensor([[0, 0], [0, 2]]), torch.zeros(2, VOCAB), torch.tensor([0, 1]))
    assert scores[0].isinf().nonzero().flatten().tolist() == [4]
    assert scores[1].isinf().nonzero().flatten().tolist() == [3]
    assert Bans.build([[], []], VOCAB) is None
