"""CaptioningRNN: loss and training, encode/step/sample, the frozen backbone, and backbone weight files."""

import numpy as np
import pytest
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from captool.decode import greedy
from captool.training import CaptioningRNN, FeatureExtractor, ModelConfig, TrainingError

TOKENS = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "red", "blue", "circle", "square"]
WORD_TO_IDX = {t: i for i, t in enumerate(TOKENS)}
CELLS = ["rnn", "lstm", "attention"]


def tiny_model(cell="rnn", **kwargs):
    torch.manual_seed(0)
    return CaptioningRNN(WORD_TO_IDX, wordvec_dim=8, hidden_dim=16, cell_type=cell, backbone_width=0.25, **kwargs)


def images(n=3, seed=0):
    return torch.randint(0, 256, (n, 3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def captions(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = torch.zeros(n, 9, dtype=torch.long)
    caps[:, 0] = 1
    caps[:, 1:6] = torch.randint(4, len(TOKENS), (n, 5), generator=g)
    caps[:, 6] = 2  # <END>, then <NULL> padding
    return caps


@pytest.mark.parametrize("cell", CELLS)
def test_loss_is_finite_and_decreases(cell):
    model = tiny_model(cell).train()
    imgs, caps = images(), captions()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(imgs, caps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("cell", CELLS)
def test_loss_from_cached_features_equals_forward(cell):
    model = tiny_model(cell).train()
    imgs, caps = images(), captions()
    with torch.no_grad():
        features = model.extract_features(imgs)
    assert features.shape == ((3, 1280, 4, 4) if cell == "attention" else (3, 1280))
    torch.testing.assert_close(model.loss_from_features(features, caps), model(imgs, caps), rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_encode_and_step_give_the_bundle_names_and_shapes(cell):
    model = tiny_model(cell).eval()
    with torch.no_grad():
        enc = model.encode(images(1))  # N = 1 keeps its batch dim everywhere
        expected = {"rnn": {"h0"}, "lstm": {"h0", "c0"}, "attention": {"h0", "c0", "features"}}[cell]
        assert set(enc) == expected and enc["h0"].shape == (1, 16)
        if cell == "lstm":
            assert torch.count_nonzero(enc["c0"]) == 0
        if cell == "attention":
            assert enc["features"].shape == (1, 16, 4, 4)
            torch.testing.assert_close(enc["h0"], enc["features"].mean(dim=(2, 3)))
            torch.testing.assert_close(enc["c0"], enc["h0"])
        state = {"h": enc["h0"], "c": enc.get("c0"), "features": enc.get("features")}
        out = model.step(torch.tensor([1]), **state)
    keys = {"rnn": {"logits", "h_next"}, "lstm": {"logits", "h_next", "c_next"},
            "attention": {"logits", "h_next", "c_next", "attn_weights"}}[cell]
    assert set(out) == keys
    assert out["logits"].shape == (1, len(TOKENS)) and out["h_next"].shape == (1, 16)
    if cell == "attention":
        assert out["attn_weights"].shape == (1, 4, 4)
        torch.testing.assert_close(out["attn_weights"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("cell", CELLS)
def test_sample_equals_the_runtime_greedy_loop_over_encode_and_step(cell):
    model = tiny_model(cell).eval()
    with torch.no_grad():  # make some captions end early, so END and NULL show up
        model.out_projector.bias[2] += 1.5
    imgs = images(4)
    tokens = model.sample(imgs, max_length=7)
    assert tokens.shape == (4, 7) and tokens.dtype == torch.int64

    def step(feeds):
        with torch.no_grad():
            out = model.step(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return {k: v.numpy() for k, v in out.items()}

    with torch.no_grad():
        enc = {k: v.numpy() for k, v in model.encode(imgs).items()}
    expected = greedy(enc, step, start_id=1, end_id=2, null_id=0, max_length=7)
    np.testing.assert_array_equal(tokens.numpy(), expected)


def test_sample_keeps_end_puts_null_after_it_and_stops_when_all_ended():
    model = tiny_model("lstm").eval()
    scripts = torch.tensor([[4, 5, 2, 6, 7], [2, 8, 8, 8, 8], [4, 5, 6, 2, 7]])  # row t: word chosen at step t
    calls = []
    real_step = model.step

    def scripted_step(token, h, c=None, features=None):
        out = real_step(token, h, c, features)
        logits = torch.zeros_like(out["logits"])
        logits[torch.arange(3), scripts[:, len(calls)]] = 1.0
        calls.append(token.clone())
        return {**out, "logits": logits}

    model.step = scripted_step
    tokens = model.sample(images(3), max_length=6)
    assert tokens.tolist() == [[4, 5, 2, 0, 0, 0], [2, 0, 0, 0, 0, 0], [4, 5, 6, 2, 0, 0]]
    assert len(calls) == 4  # every caption had ended after step 4
    assert calls[0].tolist() == [1, 1, 1] and calls[1].tolist() == [4, 2, 4]  # <START>, then its own argmax


def test_sample_takes_the_first_maximum_on_ties():
    model = tiny_model("rnn").eval()
    with torch.no_grad():
        model.out_projector.weight.zero_()
        model.out_projector.bias.zero_()
        model.out_projector.bias[[2, 5]] = 1.0  # <END> and "red" tie: the first, <END>, wins
    assert model.sample(images(2), max_length=4).tolist() == [[2, 0, 0, 0]] * 2
    with torch.no_grad():
        model.out_projector.bias[[2, 5]] = 0.0  # all equal: id 0 (<NULL>) every step, never ends
    assert model.sample(images(2), max_length=4).tolist() == [[0, 0, 0, 0]] * 2


def test_frozen_backbone_stays_in_eval_and_gets_no_gradients():
    model = tiny_model("rnn").train()
    backbone = model.feature_extractor.backbone
    assert not model.backbone_trainable
    assert not any(m.training for m in backbone.modules()) and model.cell.training
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model(images(), captions()).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert model.feature_projector.weight.grad is not None
    for k, v in backbone.state_dict().items():  # BatchNorm running statistics untouched too
        assert torch.equal(v, before[k]), k

    model.set_backbone_trainable(True)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
    model(images(), captions()).backward()
    assert all(p.grad is not None for p in backbone.parameters())
    model.eval()
    assert not backbone.training
    model.set_backbone_trainable(False)
    model.train()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_feature_extractor_normalizes_uint8_as_imagenet():
    fe = FeatureExtractor(width=0.25, pooling=False).eval()
    imgs = images(2)
    x = (imgs.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(fe(imgs), fe.backbone(x))
    assert "mean" not in fe.state_dict() and "std" not in fe.state_dict()
    with pytest.raises(TrainingError, match="uint8"):
        fe(imgs.float())


def test_config_records_the_architecture_and_rejects_bad_values():
    model = tiny_model("attention", max_length=12)
    assert model.config == ModelConfig(cell_type="attention", vocab_size=len(TOKENS), input_dim=1280, wordvec_dim=8,
                                       hidden_dim=16, backbone_width=0.25, image_size=112, max_length=12)
    assert model.idx_to_token == TOKENS
    assert isinstance(model.feature_projector, torch.nn.Conv2d)
    assert model.sample(images(1)).shape == (1, 12)
    with pytest.raises(TrainingError, match="only rnn, lstm, attention"):
        tiny_model("gru")
    with pytest.raises(TrainingError, match="input_dim=512"):
        CaptioningRNN(WORD_TO_IDX, input_dim=512, backbone_width=0.25)
    with pytest.raises(TrainingError, match="ids 0..2"):
        CaptioningRNN({"<NULL>": 0, "<START>": 1, "<END>": 5}, backbone_width=0.25)
    with pytest.raises(TrainingError, match="unknown model config keys"):
        ModelConfig.from_dict({**model.config.to_dict(), "dropout": 0.1})


def test_backbone_from_local_state_dict_files(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2(weights=None, width_mult=0.25)
    pth = tmp_path / "mobilenet.pth"
    torch.save(reference.state_dict(), pth)  # a full-model state dict, "features." keys and classifier
    from safetensors.torch import save_file

    st = tmp_path / "features.safetensors"
    save_file({k: v.contiguous() for k, v in reference.features.state_dict().items()}, str(st))
    for path in (pth, st):
        model = tiny_model("rnn", backbone=str(path))
        for k, v in reference.features.state_dict().items():
            assert torch.equal(model.feature_extractor.backbone.state_dict()[k], v), (path, k)


def test_bad_backbone_sources_give_clear_errors(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict at all")
    with pytest.raises(TrainingError, match="cannot read backbone weights .*garbage.pth"):
        tiny_model(backbone=str(garbage))
    other = tmp_path / "resnet.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(2, 3, 1, 1)}, str(other))
    with pytest.raises(TrainingError, match="not a MobileNetV2 state dict"):
        tiny_model(backbone=str(other))
    wide = tmp_path / "wide.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).state_dict(), wide)
    with pytest.raises(TrainingError, match="another width"):
        tiny_model(backbone=str(wide))
    with pytest.raises(TrainingError, match="does not exist"):
        tiny_model(backbone=str(tmp_path / "missing.pth"))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(TrainingError, match=r"hub/checkpoints/mobilenet_v2-b0353104\.pth does not exist"):
        CaptioningRNN(WORD_TO_IDX, wordvec_dim=8, hidden_dim=16, backbone="imagenet")
    with pytest.raises(TrainingError, match="width 1.0 only"):
        tiny_model(backbone="imagenet")
