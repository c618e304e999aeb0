"""The concept-detector warm-up and per-epoch caption sampling of the training loop."""

import pytest

torch = pytest.importorskip("torch")

from captool.training.data import CaptionSplit
from captool.training.model import CaptioningRNN
from captool.training.train import epoch_rows
from captool.training.warmup import concept_targets, pair_targets, word_targets, warm_up_backbone
from captool.vocab import Vocab

VOCAB = Vocab(["<NULL>", "<START>", "<END>", "<UNK>", "red", "blue", "circle", "square"])


def split_of(captions: list[str], image_idx: list[int], n_images: int) -> CaptionSplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 112, 112), dtype=torch.uint8, generator=g)
    rows = torch.tensor([VOCAB.encode(c) for c in captions])
    return CaptionSplit(images, rows, torch.tensor(image_idx))


def test_word_targets_are_the_union_of_each_images_caption_words():
    split = split_of(["a red circle", "red circle", "a blue square"], [0, 0, 1], 2)
    targets = word_targets(split, len(VOCAB))
    ids = VOCAB.token_to_idx
    assert targets.shape == (2, len(VOCAB))
    assert targets[0].nonzero().flatten().tolist() == [ids["red"], ids["circle"]]
    assert targets[1].nonzero().flatten().tolist() == [ids["blue"], ids["square"]]
    assert targets[:, :4].sum() == 0  # specials (and <UNK> for "a", not in VOCAB) are no concepts


def test_pair_targets_bind_colour_to_shape():
    # Image 0 has a red circle and a blue square; image 1 a blue circle and a red square: the same words.
    split = split_of(["red circle blue square", "blue square red circle", "blue circle red square"], [0, 0, 1], 2)
    words = word_targets(split, len(VOCAB))
    assert torch.equal(words[0], words[1])
    pairs = pair_targets(split, len(VOCAB), min_images=1)
    assert pairs.shape == (2, 7)  # image 0: red circle, circle blue, blue square, square red; image 1: three more
    assert not torch.equal(pairs[0], pairs[1])
    assert pairs.sum(dim=1).tolist() == [4, 3] and (pairs[0] * pairs[1]).sum() == 0
    assert pair_targets(split, len(VOCAB), min_images=2).shape == (2, 0)  # no pair in two images
    assert pair_targets(split, len(VOCAB), max_pairs=2, min_images=1).shape == (2, 2)
    both = concept_targets(split, len(VOCAB))
    assert both.shape[1] == len(VOCAB) + pair_targets(split, len(VOCAB)).shape[1]


def test_warm_up_trains_the_backbone_and_leaves_the_rest_alone():
    torch.manual_seed(0)
    split = split_of(["red circle", "blue square", "red square", "blue circle"] * 2, list(range(8)), 8)
    model = CaptioningRNN(VOCAB.token_to_idx, wordvec_dim=8, hidden_dim=8, backbone_width=0.25, train_backbone=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = warm_up_backbone(model, split, epochs=4, batch_size=4, lr=1e-3, seed=0, device=torch.device("cpu"),
                              log=lambda _: None)
    after = model.state_dict()
    assert len(losses) == 4 and losses[-1] < losses[0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("feature_extractor.") for k in changed)


def test_one_caption_per_image_visits_each_image_once_per_epoch():
    split = split_of(["red circle", "a red circle", "blue square", "a blue square", "blue"], [0, 0, 1, 1, 2], 3)
    seen = set()
    for epoch in range(20):
        rows = epoch_rows(split, True, torch.Generator().manual_seed(epoch))
        assert sorted(split.image_idx[rows].tolist()) == [0, 1, 2]
        seen.update(rows.tolist())
    assert seen == set(range(5))  # over epochs, every caption is drawn
    assert sorted(epoch_rows(split, False, torch.Generator().manual_seed(0)).tolist()) == list(range(5))
