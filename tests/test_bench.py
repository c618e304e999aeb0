"""captool bench: figures present, positive, finite and mutually sane; FLOP counts equal to hand counts.

No timing is asserted: the runs are tiny (2 images, 3 repeats, one cold start) and only their shape
and internal consistency are checked.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from captool import Captioner
from captool.benchmarks.bench import FIGURES, bench, plot, table
from captool.benchmarks.contenders import against_lines, parse_against
from captool.benchmarks.floor import best_rates, cache_level, graph_cost, machine_rates
from captool.benchmarks.pipeline import KINDS, photo_set, pipeline_counts
from captool.bundle import load_manifest
from captool.cli import app
from captool.errors import CaptoolError

onnx = pytest.importorskip("onnx")
runner = CliRunner()


@pytest.fixture(autouse=True)
def short_warmup(monkeypatch):
    monkeypatch.setattr("captool.benchmarks.bench.WARMUP_S", 0.0)  # two untimed calls per figure are enough here
RATES = {"matmul_flops": 20e9, "copy_bytes_per_s": 10e9}  # stand-ins: the tests do not time the machine


def hand_made_graph(path):
    """Conv + Gemm + batched MatMul + Add, batch dim N left symbolic, as the exporter leaves it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"conv_w": rng.standard_normal((4, 3, 3, 3)), "conv_b": rng.standard_normal(4),
               "gemm_w": rng.standard_normal((10, 100)), "mm_w": rng.standard_normal((2, 5, 6))}
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),  # (N,3,5,5) -> (N,4,5,5)
        helper.make_node("Flatten", ["c"], ["flat"]),  # (N, 100)
        helper.make_node("Gemm", ["flat", "gemm_w"], ["g"], transB=1),  # (N, 10)
        helper.make_node("Reshape", ["g", "shape"], ["r"]),  # (N, 2, 5)
        helper.make_node("Unsqueeze", ["r", "axis"], ["u"]),  # (N, 1, 2, 5)
        helper.make_node("MatMul", ["u", "mm_w"], ["m"]),  # (N, 1, 2, 5) @ (2, 5, 6) -> (N, 2, 2, 6)
        helper.make_node("Add", ["m", "m"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    inits += [numpy_helper.from_array(np.array([-1, 2, 5], dtype=np.int64), "shape"),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return sum(w.size for w in weights.values()) * 4 + 4 * 8


@pytest.mark.parametrize("batch", [1, 7])
def test_graph_cost_counts_macs_and_bytes_by_hand(tmp_path, batch):
    weight_bytes = hand_made_graph(tmp_path / "g.onnx")
    cost = graph_cost(tmp_path / "g.onnx", batch)
    conv = batch * 4 * 5 * 5 * (3 * 3 * 3)  # every output element: Cin × kH × kW multiply-adds
    gemm = batch * 10 * 100
    matmul = batch * 2 * 2 * 6 * 5  # broadcast to (N, 2, 2, 6), K = 5
    assert cost.macs == conv + gemm + matmul and cost.flops == 2 * cost.macs
    assert cost.uncounted == []
    assert cost.weight_bytes == weight_bytes
    assert cost.io_bytes == 4 * batch * (3 * 5 * 5 + 2 * 2 * 6)
    assert cost.activation_bytes > cost.io_bytes


def test_decoder_step_flops_equal_the_hand_computation(tiny_bundle):
    root = tiny_bundle("rnn")
    dims = load_manifest(root).raw["dims"]
    H, V = dims["hidden_dim"], dims["vocab_size"]
    for batch in (1, 64):
        # W_embed @ Wx + b is folded into one (V, H) table: a run reads `batch` of its rows.
        read = min(batch, V) * H + H * H + H * V + V  # table rows, Wh, output projection
        cost = graph_cost(root / "decoder_step.onnx", batch)
        assert cost.flops == 2 * batch * (H * H + H * V)  # h·Wh, h_next·W_out
        assert 4 * read <= cost.weight_bytes <= 4 * read + 64  # + a few int64 shape constants
    encoder = graph_cost(root / "encoder.onnx", 1)
    assert encoder.macs > dims["input_dim"] * H and encoder.uncounted == []


def test_cached_step_reads_no_wattn(tiny_bundle):
    """The attention cache's step: h·Wh, the weighted sum of the values, h_next·W_out; no Wattn read."""
    root = tiny_bundle("attention")
    dims = load_manifest(root).raw["dims"]
    H, V = dims["hidden_dim"], dims["vocab_size"]
    for batch in (1, 64):
        plain, cached = (graph_cost(root / name, batch) for name in ("decoder_step.onnx", "decoder_step_cached.onnx"))
        assert cached.flops == 2 * batch * (H * 4 * H + 16 * 4 * H + H * 16 + H * V)  # + scores h·keys
        read = min(batch, V) * 4 * H + H * 4 * H + H * V + V  # table rows, Wh, output projection
        assert 4 * read <= cached.weight_bytes <= 4 * read + 64
        assert plain.weight_bytes - cached.weight_bytes >= 4 * H * 4 * H  # Wattn (H, 4H) is not read
    captioner = Captioner(root, device="cpu")
    report = bench(root, images=1, repeats=2, cold=False, rates=RATES)
    assert report["step_graph"] == captioner.step_graph == "decoder_step_cached"
    assert report["floor"]["step_b1"]["weight_bytes"] == graph_cost(captioner.step_path, 1).weight_bytes


def check_figures(report: dict, sides: tuple[str, ...]) -> None:
    figures = report["figures"]
    assert set(figures) == set(FIGURES)
    for name, f in figures.items():
        for side in sides:
            assert f[side] is not None and math.isfinite(f[side]) and f[side] > 0, (name, side)
    for side in sides:
        assert figures["caption_b1_p90"][side] >= figures["caption_b1_median"][side]
        images_per_s_at_b1 = 1e3 / figures["caption_b1_median"][side]
        for batch in ("throughput_b8", "throughput_b64"):  # batching changes the rate, not its magnitude
            assert 0.01 < figures[batch][side] / images_per_s_at_b1 < 500, (batch, side)
    for name, f in report["floor"].items():
        assert f["flops"] > 0 and f["compute_floor_s"] > 0 and f["memory_floor_s"] > 0
        assert f["x_from_floor"] == pytest.approx(f["measured_s"] / max(f["compute_floor_s"], f["memory_floor_s"]))
        assert f["bound"] in ("compute", "memory")
    assert report["floor"]["step_b64"]["flops"] == 64 * report["floor"]["step_b1"]["flops"]


def test_runtime_only_bench_table_and_plot(tiny_bundle, tmp_path):
    report = bench(tiny_bundle("rnn"), images=2, repeats=3, cold_repeats=1, rates=RATES)
    check_figures(report, ("runtime",))
    assert all(f["pytorch"] is None and f["ratio"] is None for f in report["figures"].values())
    assert report["checkpoint"] is None and "tokens_agree_b64" not in report
    text = table(report)
    assert "caption_b1_median" in text and "from the" in text and "floor" in text
    plot(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_side_by_side_cli_json(tiny_bundle, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr("captool.benchmarks.bench.machine_rates", lambda: RATES)
    result = runner.invoke(app, ["bench", str(tiny_bundle("rnn")), "--checkpoint", str(tiny_checkpoint("rnn")),
                                 "--json", "--images", "2", "--repeats", "3", "--cold-repeats", "1", "--no-pipeline"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    check_figures(report, ("runtime", "pytorch"))
    for name, f in report["figures"].items():
        unit, _, higher_better = FIGURES[name]
        want = f["runtime"] / f["pytorch"] if higher_better else f["pytorch"] / f["runtime"]
        assert f["ratio"] == pytest.approx(want), name
    assert report["tokens_agree_b64"] is True and report["cold_start_captions_agree"] is True
    # importing torch + torchvision alone takes hundreds of MB; the runtime process must not carry them
    rss = report["figures"]["cold_start_peak_rss"]
    assert rss["pytorch"] > rss["runtime"] + 100
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["matmul_flops"] == RATES["matmul_flops"]


def test_bench_refuses_a_checkpoint_of_another_model(tiny_bundle, tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint("rnn"), other)
    meta = json.loads((other / "model.json").read_text())
    meta["idx_to_token"][-1] = "zebra"  # same dims and weights, another vocabulary
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CaptoolError, match="not the same model"):
        bench(tiny_bundle("rnn"), other, images=1, repeats=2, cold=False, rates=RATES)
    with pytest.raises(CaptoolError, match="takes a bundle first"):
        bench(tiny_checkpoint("rnn"), images=1, repeats=2, cold=False, rates=RATES)


@pytest.mark.slow
def test_bench_without_torch(tiny_bundle, tiny_checkpoint):
    def captool(*args):
        code = ("import sys; sys.modules['torch'] = None\nfrom captool.cli import main\n"
                f"sys.argv = ['captool', *{list(args)!r}]\nmain()")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    bundle = str(tiny_bundle("rnn"))
    alone = captool("bench", bundle, "--json", "--no-cold", "--no-pipeline", "--images", "1", "--repeats", "2")
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["figures"]["step_b1"]["runtime"] > 0
    refused = captool("bench", bundle, "--checkpoint", str(tiny_checkpoint("rnn")), "--no-cold", "--no-pipeline")
    assert refused.returncode == 2 and "captool[train]" in refused.stderr


# ---- the pipeline section, the contenders, the floor's rates -------------------------------------------


def test_pipeline_section(tiny_bundle, tmp_path):
    """`captool run` on generated photos against the model alone: both rates, their ratio, the share."""
    counts = {"jpeg_640x480": 3, "png_112": 3}  # no 12-megapixel photo here: too slow to make for a test
    report = bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES, pipeline=counts, pipeline_batch=2)
    section = report["pipeline"]
    assert section["batch_size"] == 2 and set(section["kinds"]) == set(counts)
    for name, k in section["kinds"].items():
        assert k["images"] == counts[name] and (k["width"], k["height"]) == (KINDS[name].width, KINDS[name].height)
        for key in ("pipeline_images_per_s", "model_images_per_s", "preprocess_ms"):
            assert math.isfinite(k[key]) and k[key] > 0, (name, key)
        assert k["pipeline_over_model"] == pytest.approx(k["pipeline_images_per_s"] / k["model_images_per_s"])
        assert 0 < k["preprocess_share"] < 1
    text = table(report)
    assert "pipeline" in text and "jpeg_640x480" in text and "png_112" in text
    assert "pipeline" not in bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES)


def test_photo_set_is_made_once_and_photo_like(tmp_path):
    from PIL import Image

    folder = photo_set(KINDS["jpeg_640x480"], 2, tmp_path)
    files = sorted(folder.iterdir())
    assert [f.suffix for f in files] == [".jpg", ".jpg"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert photo_set(KINDS["jpeg_640x480"], 2, tmp_path) == folder  # cached: not written again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with Image.open(files[0]) as img:
        assert img.size == (640, 480) and img.mode == "RGB"
        pixels = np.asarray(img, dtype=np.float32)
    assert pixels.std() > 20  # not a flat field: colours, edges and noise to decode
    assert pipeline_counts(256) == {"jpeg_640x480": 256, "jpeg_12mp": 8, "png_112": 256}
    with pytest.raises(CaptoolError, match="--pipeline-images must be >= 1"):
        pipeline_counts(0)


def test_onnxruntime_contender_interleaved_and_checked(tiny_bundle):
    report = bench(tiny_bundle("attention"), images=2, repeats=2, cold=False, rates=RATES, against=["onnxruntime"])
    c = report["against"]["contenders"]["onnxruntime"]
    assert c["tokens_agree_b64"] == 1.0  # the same graphs, the same greedy loop: the same tokens
    for key in ("caption_b1_ms", "throughput_b64"):
        assert set(c[key]) == {"captool", "onnxruntime"} and all(v > 0 for v in c[key].values())
    assert c["captool_faster_b1"] == pytest.approx(c["caption_b1_ms"]["onnxruntime"] / c["caption_b1_ms"]["captool"])
    text = table(report)
    assert "onnxruntime" in text and "same" in text


def test_contenders_refused_skipped_and_wrong_answers_named(tiny_bundle, monkeypatch):
    with pytest.raises(CaptoolError, match="unknown contender tensorrt; the contenders are onnxruntime, openvino"):
        parse_against("openvino,tensorrt")
    assert parse_against("onnxruntime, onnxruntime") == ["onnxruntime"] and parse_against(None) == []
    result = runner.invoke(app, ["bench", str(tiny_bundle("rnn")), "--against", "tensorrt", "--no-cold", "--no-pipeline"])
    assert result.exit_code == 2 and "unknown contender tensorrt" in result.output
    # a contender without its package is skipped with the line that installs it, not an error
    monkeypatch.setattr("captool.benchmarks.contenders.PACKAGES", {"onnxruntime": "no_such_package_xyz"})
    report = bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES, against=["onnxruntime"])
    assert report["against"]["contenders"] == {} and "not installed" in report["against"]["skipped"]["onnxruntime"]
    fast_but_wrong = {"contenders": {"quick": {"caption_b1_ms": {"quick": 0.5, "captool": 1.0},
                                               "throughput_b64": {"quick": 2000.0, "captool": 1000.0},
                                               "captool_faster_b1": 0.5, "captool_faster_b64": 0.5,
                                               "tokens_agree_b64": 0.75}}, "skipped": {}}
    line = next(ln for ln in against_lines(fast_but_wrong) if ln.startswith("quick"))
    assert "DIFFER on 25% of rows" in line and "faster, but a different answer" in line


def test_contenders_run_another_bundle_of_the_same_model(tiny_bundle, tmp_path):
    """--against-bundle: the contenders run that bundle's graphs (the fp32 one beside an int8 captool, say)."""
    import shutil

    graphs = tmp_path / "fp32"
    shutil.copytree(tiny_bundle("rnn"), graphs)
    report = bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES, against=["onnxruntime"],
                   against_bundle=graphs)
    assert report["against"]["graphs"] == str(graphs) and report["against"]["graphs_precision"] == "fp32"
    assert report["against"]["contenders"]["onnxruntime"]["tokens_agree_b64"] == 1.0
    assert f"contenders run {graphs} (fp32)" in table(report)
    with pytest.raises(CaptoolError, match="is another model than"):
        bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES, against=["onnxruntime"],
              against_bundle=tiny_bundle("lstm"))


def test_openvino_contender_both_precisions(tiny_bundle):
    pytest.importorskip("openvino")
    report = bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=RATES, against=["openvino"])
    contenders = report["against"]["contenders"]
    assert set(contenders) == {"openvino-f32", "openvino-bf16"}
    assert contenders["openvino-f32"]["tokens_agree_b64"] == 1.0  # f32: the same arithmetic up to rounding
    assert 0 <= contenders["openvino-bf16"]["tokens_agree_b64"] <= 1


def test_machine_rates_are_the_best_of_spread_samples():
    rates = machine_rates(matmul_n=64, copy_mb=1, repeats=2, samples=3, gap_s=0.0)
    assert len(rates["matmul_samples"]) == 3 and rates["matmul_flops"] == max(rates["matmul_samples"])
    assert rates["copy_bytes_per_s"] == max(rates["copy_samples"])
    later = {**rates, "matmul_flops": rates["matmul_flops"] * 2, "matmul_samples": [rates["matmul_flops"] * 2]}
    pooled = best_rates(rates, later)
    assert pooled["matmul_flops"] == rates["matmul_flops"] * 2 and len(pooled["matmul_samples"]) == 4
    caches = {"L2": {"bytes": 1 << 20, "copy_bytes_per_s": 80e9}, "L3": {"bytes": 32 << 20, "copy_bytes_per_s": 40e9}}
    assert cache_level(400_000, caches) == "L2" and cache_level(1_200_000, caches) == "L3"
    assert cache_level(100 << 20, caches) is None


def test_below_the_floor_names_the_cache_level(tiny_bundle):
    """A figure under its DRAM floor is explained by the cache level its bytes fit in, never left bare."""
    caches = {"L2": {"bytes": 1 << 20, "copy_bytes_per_s": 80e9}, "L3": {"bytes": 1 << 30, "copy_bytes_per_s": 40e9}}
    slow_dram = {"matmul_flops": 1e15, "copy_bytes_per_s": 1e6, "caches": caches,  # every figure memory-bound, below
                 "matmul_samples": [1e15], "copy_samples": [1e6]}
    report = bench(tiny_bundle("rnn"), images=1, repeats=2, cold=False, rates=slow_dram)
    text = table(report)
    below = [ln for ln in text.splitlines() if "from the memory floor" in ln]
    assert below and all("below it" in ln and ("stay in L2" in ln or "stay in L3" in ln) for ln in below)
    for f in report["floor"].values():
        assert f["cache_level"] in ("L2", "L3") and f["cache_floor_s"] > 0
