"""captool eval: pycocoevalcap's own numbers, the torch-free bundle path, and the checkpoint side beside it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from captool.cli import app
from captool.errors import CaptoolError
from captool.evaluation import evaluate, load_eval_set, score_captions
from captool.datasets.facts import fact_accuracy, load_scenes
from captool.datasets.synth import write_dataset

runner = CliRunner()

CAPTIONS = [  # (image id, reference) with the punctuation and case a real annotation file has
    (1, "A red circle on the left."), (1, "a red circle"), (1, "There is a large red circle."),
    (2, "Two blue squares and a green star"), (2, "two blue squares, a green star"),
    (3, "a yellow triangle at the top"), (3, "one shape: a yellow triangle"),
    (4, "An orange cross and a purple circle"), (4, "an orange cross to the left of a purple circle"),
]
RESULTS = {1: "a red circle", 2: "two blue squares and a red star", 3: "a yellow square",
           4: "an orange cross and a purple circle on the right"}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "synth"
    write_dataset(out, train=2, val=6, seed=3)
    return out


def references() -> dict:
    refs: dict = {}
    for image_id, caption in CAPTIONS:
        refs.setdefault(image_id, []).append(caption)
    return refs


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs java")
def test_scores_equal_cocoevalcap_reference_pipeline(tmp_path, monkeypatch):
    COCO = pytest.importorskip("pycocotools.coco").COCO
    import pycocoevalcap.eval as reference

    ann = {"info": {}, "licenses": [], "type": "captions",
           "images": [{"id": i, "file_name": f"{i}.png"} for i in RESULTS],
           "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(CAPTIONS)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in RESULTS.items()]))

    class Off:  # METEOR takes ~10 s of java and SPICE needs downloaded models: not part of this check
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "off"

    monkeypatch.setattr(reference, "Meteor", Off)
    monkeypatch.setattr(reference, "Spice", Off)
    coco = COCO(str(tmp_path / "ann.json"))
    results = coco.loadRes(str(tmp_path / "res.json"))
    cocoeval = reference.COCOEvalCap(coco, results)
    cocoeval.params["image_id"] = results.getImgIds()
    cocoeval.evaluate()
    want = cocoeval.eval

    got, tokenizer = score_captions(RESULTS, references(), tokenizer="ptb")
    assert tokenizer == "ptb"
    names = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4",
             "rouge_l": "ROUGE_L", "cider": "CIDEr"}
    for ours, theirs in names.items():
        assert got[ours] == pytest.approx(float(want[theirs]), abs=1e-9), ours
    assert 0.3 < got["bleu4"] < 1 and got["cider"] > 1  # a fixture that scores something, not all zeros

    # Without java: captool's tokenizer gives the same tokens on plain captions, so the same scores.
    simple, tokenizer = score_captions(RESULTS, references(), tokenizer="simple")
    assert tokenizer == "simple"
    assert simple == pytest.approx(got, abs=1e-12)


def test_perfect_and_wrong_captions_score_as_expected():
    refs = references()
    perfect, _ = score_captions({i: cs[0] for i, cs in refs.items()}, refs, tokenizer="simple")
    wrong, _ = score_captions({i: "zebra zebra zebra zebra" for i in refs}, refs, tokenizer="simple")
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert wrong["bleu1"] < 1e-6 and wrong["cider"] == 0.0
    with pytest.raises(CaptoolError, match="same image ids"):
        score_captions({1: "a red circle"}, refs, tokenizer="simple")


def test_eval_bundle_json_with_fact_accuracy(tiny_bundle, synth_data, tmp_path):
    predictions = tmp_path / "predictions.json"
    result = runner.invoke(app, ["eval", str(tiny_bundle("rnn")), "--data", str(synth_data), "--json",
                                 "--tokenizer", "simple", "--batch-size", "4", "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model_kind"] == "bundle" and report["tokenizer"] == "simple"
    assert report["n_images"] == 6 and report["split"] == "val"
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "fact_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["cider"] >= 0.0 and "meteor" not in report
    rows = json.loads(predictions.read_text())
    assert [r["image_id"] for r in rows] == list(range(6))
    scenes = load_scenes(synth_data / "annotations" / "captions_val.json")
    assert report["fact_accuracy"] == fact_accuracy({r["image_id"]: r["caption"] for r in rows}, scenes)


def test_checkpoint_side_gives_the_bundles_captions(tiny_bundle, tiny_checkpoint, synth_data):
    on_bundle = evaluate(tiny_bundle("rnn"), synth_data, max_images=4, tokenizer="simple")
    on_checkpoint = evaluate(tiny_checkpoint("rnn"), synth_data, max_images=4, tokenizer="simple")
    assert (on_bundle.model_kind, on_checkpoint.model_kind) == ("bundle", "checkpoint")
    assert on_bundle.n_images == on_checkpoint.n_images == 4
    assert on_bundle.predictions == on_checkpoint.predictions  # the export is token-identical
    assert on_bundle.metrics == on_checkpoint.metrics


def test_beam_search_on_a_checkpoint_is_refused_clearly(tiny_checkpoint, synth_data):
    result = runner.invoke(app, ["eval", str(tiny_checkpoint("rnn")), "--data", str(synth_data), "--beam-size", "3"])
    assert result.exit_code == 2
    assert "bundles only" in result.stderr and "--beam-size 1" in result.stderr


def test_bundle_eval_never_imports_torch(tiny_bundle, synth_data):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from captool.cli import main\n"
            f"sys.argv = ['captool', 'eval', {str(tiny_bundle('rnn'))!r}, '--data', {str(synth_data)!r}, "
            "'--json', '--tokenizer', 'simple', '--max-images', '3']\n"
            "main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_images"] == 3


def test_unreadable_image_is_skipped_with_exit_1(tiny_bundle, synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "val" / "000002.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["eval", str(tiny_bundle("rnn")), "--data", str(data), "--json", "--tokenizer", "simple"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["n_images"] == 5 and json.loads(result.stdout)["n_skipped"] == 1
    assert "000002.png" in result.stderr


def test_bad_data_and_model_paths_are_one_line_errors(tiny_bundle, synth_data, tmp_path):
    missing = runner.invoke(app, ["eval", str(tiny_bundle("rnn")), "--data", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    no_split = runner.invoke(app, ["eval", str(tiny_bundle("rnn")), "--data", str(synth_data), "--split", "test"])
    assert no_split.exit_code == 2 and "captions_test" in no_split.stderr
    not_a_model = runner.invoke(app, ["eval", str(tmp_path), "--data", str(synth_data)])
    assert not_a_model.exit_code == 2 and "neither a bundle" in not_a_model.stderr
    assert all(len(r.stderr.strip().splitlines()) == 1 for r in (missing, no_split, not_a_model))


def test_missing_eval_extra_names_it(tiny_bundle, synth_data, monkeypatch):
    for name in [n for n in sys.modules if n.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)
    result = runner.invoke(app, ["eval", str(tiny_bundle("rnn")), "--data", str(synth_data)])
    assert result.exit_code == 2 and "captool[eval]" in result.stderr


def test_karpathy_json_split_is_read_without_torch(synth_data, tmp_path):
    doc = {"dataset": "coco", "images": [
        {"filepath": "val", "filename": f"00000{i}.png", "cocoid": 100 + i, "split": split,
         "sentences": [{"raw": f"caption {i}", "tokens": ["caption", str(i)]}]}
        for i, split in enumerate(["val", "test", "val", "train"])]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    evalset = load_eval_set(path, "val", image_dir=synth_data)
    assert evalset.format == "karpathy-json" and evalset.ids == [100, 102]
    assert evalset.references == {100: ["caption 0"], 102: ["caption 2"]}
    assert evalset.images[1] == synth_data / "val" / "000002.png" and evalset.images[1].is_file()
    assert evalset.scenes is None
