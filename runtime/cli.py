"""The `captool` command: a thin typer layer over functions that can be imported and tested.

Heavy packages (torch for train/export) are imported inside the commands that need them, so
`captool run` starts fast and works on a box that has no torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Iterator, Mapping, Optional

import typer

from .errors import CaptoolError, MissingExtraError

app = typer.Typer(
    name="captool",
    help="Train a small image captioner, export it to a verified ONNX bundle, caption images anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"captool {__version__}")
        raise typer.Exit()


@app.callback()
def _commands(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print captool's version and exit.")] = False,
) -> None:
    # A callback keeps `captool synth ...` a subcommand even while only one command is registered
    # (typer otherwise runs a lone command as the whole program).
    pass


# Which extra provides each heavy module, for the "install captool[...]" message.
_EXTRA_OF = {"torch": "train", "torchvision": "train", "safetensors": "train", "onnx": "export",
             "onnxscript": "export", "pycocoevalcap": "eval", "matplotlib": "bench"}


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one line to stderr and return the Exit to raise (2: usage or bundle error, 1: failed)."""
    typer.echo(f"captool: error: {message}", err=True)
    return typer.Exit(code=code)


def need(module: str):
    """Import a heavy package module, or fail naming the extra that installs what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing in _EXTRA_OF:
            raise MissingExtraError(_EXTRA_OF[missing], missing) from None
        raise


@contextlib.contextmanager
def errors_to_exit(code: int = 2) -> Iterator[None]:
    """Domain errors become a one-line message and an exit code here, and only here."""
    try:
        yield
    except CaptoolError as e:
        raise fail(str(e), code) from None


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) runs the same clean-up as Ctrl-C: no temporary files are left behind."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the dataset into (COCO captions format).")],
    train: Annotated[int, typer.Option(help="Number of training images.")] = 2000,
    val: Annotated[int, typer.Option(help="Number of validation images.")] = 200,
    seed: Annotated[int, typer.Option(help="Generator seed; the same seed gives the same files.")] = 0,
    photo: Annotated[Optional[str], typer.Option(
        help="Draw each scene as a WIDTHxHEIGHT JPEG photo (e.g. 640x480) instead of a 112-pixel PNG: camera-sized "
             "files with known captions, for `export --jpeg-decode scaled --images` and for timing.",
        show_default=False)] = None,
) -> None:
    """Write a procedurally generated dataset of shape scenes with reference captions and scene facts."""
    from captool.datasets.synth import write_dataset

    size = None
    if photo is not None:
        try:
            width, height = (int(v) for v in photo.lower().split("x"))
            size = (width, height)
        except ValueError:
            typer.echo(f"captool: --photo must be WIDTHxHEIGHT such as 640x480, got {photo!r}", err=True)
            raise typer.Exit(code=2) from None

    def progress(split: str, done: int, total: int) -> None:
        if total >= 1000 and (done % 1000 == 0 or done == total):
            typer.echo(f"synth: {split} {done}/{total}", err=True)

    with errors_to_exit():
        summary = write_dataset(out, train=train, val=val, seed=seed, progress=progress, photo=size)
    typer.echo(summary)


class _TrainDefaults(Mapping):
    """TrainConfig's defaults as `captool train`'s default_map: read from captool.training.config (torch-free)
    when the command runs or shows --help, so that the defaults are written in one place only."""

    def _defaults(self) -> dict:
        from captool.training.config import defaults

        return {k: v for k, v in defaults().items() if k not in ("data", "out", "images") and v is not None}

    def __getitem__(self, name):
        return self._defaults()[name]

    def __iter__(self):
        return iter(self._defaults())

    def __len__(self) -> int:
        return len(self._defaults())


# Options below without a default of their own take TrainConfig's (the default_map); `given` then holds only
# what the command line set, so that --resume keeps the run's own settings.
@app.command("train", context_settings={"default_map": _TrainDefaults()})
def train_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Run directory: checkpoint, training state, cached features.")],
    data: Annotated[Optional[Path], typer.Option(
        help="coco.pt, a COCO captions folder or JSON, or a Karpathy dataset_*.json (not needed with --resume).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of the image files, when not beside the annotations.")] = None,
    cell: Annotated[Optional[str], typer.Option(help="Recurrent cell: rnn, lstm or attention.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Total epochs (with --resume: up to this many).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples (image, caption) per step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    lr_decay: Annotated[Optional[float], typer.Option(help="Learning rate factor per epoch (epoch e: lr * decay**e).")] = None,
    hidden_dim: Annotated[Optional[int], typer.Option(help="RNN hidden state size.")] = None,
    wordvec_dim: Annotated[Optional[int], typer.Option(help="Word vector size.")] = None,
    backbone: Annotated[Optional[str], typer.Option(
        help="MobileNetV2 weights: imagenet (torchvision's cache), a state-dict file, or none (random, trained).")] = None,
    backbone_width: Annotated[Optional[float], typer.Option(help="MobileNetV2 width multiplier (1.0 is the seed's).")] = None,
    train_backbone: Annotated[bool, typer.Option("--train-backbone", help="Train MobileNetV2 end to end too.")] = False,
    overfit: Annotated[Optional[int], typer.Option(
        help="Train on N examples only, the first caption of the first N images; with the seed's 80 epochs "
             "and batch 50 unless given.")] = None,
    min_count: Annotated[Optional[int], typer.Option(help="Words seen fewer times become <UNK> (JSON datasets).")] = None,
    one_caption_per_image: Annotated[bool, typer.Option(
        "--one-caption-per-image",
        help="Each epoch, one of each image's captions drawn at random (epochs cost images, not captions).")] = False,
    warmup_epochs: Annotated[Optional[int], typer.Option(
        help="Epochs of concept-detector warm-up (caption words and word pairs) of the backbone before "
             "captioning; the backbone is then frozen unless --train-backbone.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the initial weights and the data order.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for torch (1 measured fastest on a shared 2-core machine: README).")] = None,
    quality_images: Annotated[Optional[int], typer.Option(
        help="Validation images captioned and scored after each epoch (quality.json); 0: no report.")] = None,
    jpeg_decode: Annotated[Optional[str], typer.Option(
        help="JPEG files decoded in full, or 'scaled' (libjpeg's DCT scaling, 2-7x faster on photos: "
             "docs/bundle-format.md); the model keeps it and its bundle is run with it.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
) -> None:
    """Train a captioner: a checkpoint per epoch (and per warm-up epoch) in --out, resumable, a quality report per epoch."""
    # Only the options given on the command line: with --resume the others come from the run itself.
    # (Compared by name: typer vendors its own copy of click's ParameterSource.)
    given = {name: str(value) if isinstance(value, Path) else value for name, value in ctx.params.items()
             if name != "resume" and ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    with errors_to_exit():  # before torch loads: a wrong path costs a fraction of a second
        from captool.training.config import OVERFIT_BATCH, OVERFIT_EPOCHS, check_paths

        if not resume and data is None:
            raise fail("--data is required (except with --resume)")
        check_paths(out, data, images, resume)
    if overfit is not None and not resume:
        seed_run = {k: v for k, v in (("epochs", OVERFIT_EPOCHS), ("batch_size", min(OVERFIT_BATCH, overfit)))
                    if k not in given}
        if seed_run:
            typer.echo(f"train: --overfit {overfit} with the seed's {seed_run}", err=True)
        given.update(seed_run)
    with errors_to_exit():
        training = need("captool.training.train")
    try:
        with terminate_as_interrupt():
            with errors_to_exit():
                config = training.resume_config(out, **given) if resume else training.TrainConfig(**given)
                training.use_threads(config.threads)
                run = training.TrainingRun(config, resume=resume)
            with errors_to_exit(code=1):
                result = run.fit()
    except KeyboardInterrupt:  # every epoch (and warm-up epoch) is committed whole: say which one, and how to go on
        typer.echo(f"captool: {training.interrupted(out)}", err=True)
        raise typer.Exit(code=130) from None
    typer.echo(result.summary())


# The parity bounds export and verify share (docs/export.md, "How equal is equal").
_ROUNDING_HELP = ("fp32 graphs: each row of each output may differ from PyTorch by this many times float32's "
                  "rounding error on that row, measured against float64 (x 4 for the step graphs) [default: 8].")
_ATOL_HELP = "fp32 graphs: absolute slack added to every row's bound [default: 0]."
_REL_ERR_HELP = "fp16/int8: the bound on each output's ||bundle - torch|| / ||torch|| [default: 0.02 fp16, 0.25 int8]."


@app.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(help="Checkpoint run directory (or its model.json) from `captool train`.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write; it appears only once validation passes.")],
    opset: Annotated[int, typer.Option(help="ONNX opset of both graphs (18 or higher).")] = 18,
    images: Annotated[Optional[Path], typer.Option(help="Also validate on the image files in this folder "
                                                        "(fp16/int8: validate on these real images).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle at --out.")] = False,
    precision: Annotated[str, typer.Option(help="fp32; fp16 (GPU bundle); int8 (CPU bundle: static QDQ encoder, "
                                                "dynamic int8 decoder step).")] = "fp32",
    calibration: Annotated[Optional[Path], typer.Option(help="int8: images to calibrate on, a folder or a dataset "
                                                             "(its train split); default: the run's training data.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="fp16/int8: share of validation images whose caption "
                                                                "must equal PyTorch's (default 0.98 fp16, 0.85 int8).")] = None,
    rounding_factor: Annotated[Optional[float], typer.Option(help=_ROUNDING_HELP, show_default=False)] = None,
    atol: Annotated[Optional[float], typer.Option(help=_ATOL_HELP, show_default=False)] = None,
    rel_err: Annotated[Optional[float], typer.Option(help=_REL_ERR_HELP, show_default=False)] = None,
    jpeg_decode: Annotated[Optional[str], typer.Option(
        help="How the bundle decodes JPEG files: full, or scaled (libjpeg's DCT scaling; needs --images of held-out "
             "photos, and is refused if it changes more than --max-caption-change of their captions) "
             "[default: the model's own, as trained].", show_default=False)] = None,
    max_caption_change: Annotated[float, typer.Option(
        help="--jpeg-decode scaled: the largest share of held-out photos whose caption may change.")] = 0.01,
) -> None:
    """Export a checkpoint to an ONNX bundle, proven equal to PyTorch to the token (fp16/int8: within their tolerance).

    Exit 0: bundle written; 1: validation failed (the table says where; nothing written); 2: usage or checkpoint error.
    """
    if out.exists() and not force:  # before torch is imported: that alone takes seconds
        raise fail(f"{out} already exists; pass --force to replace it")
    with errors_to_exit(), terminate_as_interrupt():
        need("onnx")  # first, so that a box without torch and onnx is told the 'export' extra
        export = need("captool.export")
        try:
            report = export.export_bundle(run_dir, out, opset=opset, images=images, overwrite=force,
                                          precision=precision, calibration=calibration,
                                          min_agreement=min_agreement, rounding_factor=rounding_factor,
                                          atol=atol, rel_err=rel_err, jpeg_decode=jpeg_decode,
                                          max_caption_change=max_caption_change)
        except export.ExportError as e:
            if e.report is None:
                raise
            typer.echo(e.report.table())
            raise fail(str(e), code=1) from None
        except KeyboardInterrupt:  # the temporary directory is gone already; --out is as it was
            raise fail(f"interrupted; {out} was left as it was", code=130) from None
    typer.echo(report.table())
    decoding = json.loads((out / "manifest.json").read_text()).get("parity", {}).get("jpeg_decode")
    if decoding:
        typer.echo(decoding["summary"])
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(out.iterdir()) if p.suffix == ".onnx")
    typer.echo(f"export: wrote {out} ({sizes})")


@app.command("verify")
def verify_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle directory to check.")],
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint run directory the bundle was exported from.")],
    images: Annotated[Optional[Path], typer.Option(help="Also validate on the image files in this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the parity report as one JSON object.")] = False,
    rounding_factor: Annotated[Optional[float], typer.Option(help=_ROUNDING_HELP, show_default=False)] = None,
    atol: Annotated[Optional[float], typer.Option(help=_ATOL_HELP, show_default=False)] = None,
    rel_err: Annotated[Optional[float], typer.Option(help=_REL_ERR_HELP, show_default=False)] = None,
) -> None:
    """Prove a bundle equal to its checkpoint's PyTorch model: tensors within float32 rounding, greedy tokens identical.

    Exit 0: equal; 1: they differ (or the bundle is of another checkpoint); 2: usage, bundle or checkpoint error.
    """
    with errors_to_exit():
        need("onnx")
        export = need("captool.export")
        report = export.verify_bundle(bundle, checkpoint, images=images, rounding_factor=rounding_factor,
                                      atol=atol, rel_err=rel_err)
    typer.echo(json.dumps(report.to_json()) if as_json else report.table())
    if not report.ok:
        raise typer.Exit(code=1) if as_json else fail(report.failure(), code=1)


@app.command("run")
def run_command(
    inputs: Annotated[list[str], typer.Argument(
        help="Image files, directories (searched recursively for image files) and globs.", show_default=False)],
    model: Annotated[Optional[Path], typer.Option(
        help="Bundle directory (from `captool export`); default: the bundle shipped with captool.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if it loads, else CPU), cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 32,
    beam_size: Annotated[int, typer.Option(min=1, help="Beam width; 1 is greedy decoding.")] = 1,
    max_length: Annotated[Optional[int], typer.Option(
        min=1, help="Most tokens per caption; default: the bundle's.", show_default=False)] = None,
    length_penalty: Annotated[float, typer.Option(
        min=0.0, help="Beam search length normalization alpha (GNMT's ((5+len)/6)**alpha); 0 is none.")] = 0.0,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per input, in input order.")] = False,
    threads: Annotated[Optional[int], typer.Option(
        min=1, help="CPU threads for the encoder (default: one per core).", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show onnxruntime's own log and the providers.")] = False,
    attention_cache: Annotated[Optional[bool], typer.Option(
        "--attention-cache/--no-attention-cache",
        help="Decode with the bundle's attention cache (default: where the bundle has one).", show_default=False)] = None,
    io_binding: Annotated[bool, typer.Option(
        "--io-binding/--no-io-binding", help="Run the decoder step through IO binding (bound buffers; on CUDA the "
                                             "state stays on the GPU). Off: session.run every step.")] = True,
    spin: Annotated[bool, typer.Option(
        "--spin/--no-spin", help="Encoder threads spin between ops within a run (faster at small batches; "
                                 "--no-spin on a machine whose cores are busy).")] = True,
    engine: Annotated[str, typer.Option(
        help="local: this process; ray: a Ray cluster (the ray extra), records into --out (docs/scale.md).")] = "local",
    address: Annotated[Optional[str], typer.Option(
        help="With --engine ray: the cluster (auto, host:port, ray://host:10001); default: a new local one.",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="With --engine ray: a folder of JSON Lines parts, one record per input; a rerun into it captions only "
             "the inputs it lacks.", show_default=False)] = None,
    actors: Annotated[int, typer.Option(min=1, help="With --engine ray: captioning actors (each holds --threads CPUs, "
                                                    "default 1, or a GPU with --device cuda).")] = 2,
) -> None:
    """Caption images on onnxruntime, no PyTorch needed.

    Exit 0: all captioned; 1: some input failed; 2: usage or bundle error; 3: output not written (full disk, closed stdout); 130: interrupted.
    """
    import os
    import signal
    import threading

    def interrupted_at_startup(signum, frame) -> None:
        # Until the first image is read nothing needs cleaning up, and a KeyboardInterrupt raised inside
        # an import or onnxruntime's start-up comes out as a traceback: say one line and go.
        with contextlib.suppress(OSError):
            os.write(2, b"captool: error: interrupted\n")
        os._exit(130)

    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous in (None, signal.SIG_IGN):  # not ours to change (a thread, a job started with SIGINT ignored)
        previous = None
    else:
        signal.signal(signal.SIGINT, interrupted_at_startup)

    def started() -> None:  # from the first image on, Ctrl-C is a KeyboardInterrupt again
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    if engine not in ("local", "ray"):
        raise fail(f"unknown --engine {engine!r}; use local or ray")
    if engine == "ray" or address is not None or out is not None:
        started()  # Ray starts processes of its own: Ctrl-C must reach the clean-up, not os._exit
        if engine != "ray" or out is None:
            raise fail("--engine ray writes its records into a folder: give --engine ray and --out DIR "
                       "(--address and --out go with --engine ray only)")
        raise typer.Exit(code=run_on_ray(inputs, out, address=address, model=model, device=device, actors=actors,
                                         threads=threads, batch_size=batch_size, beam_size=beam_size,
                                         max_length=max_length, length_penalty=length_penalty))
    try:
        from .run import OUTPUT_ERROR_EXIT, OutputError, run_inputs

        if device not in ("auto", "cpu", "cuda"):
            raise fail(f"unknown --device {device!r}; use auto, cpu or cuda")
        with errors_to_exit():
            try:
                code = run_inputs(inputs, model=model, device=device, batch_size=batch_size, beam_size=beam_size,
                                  max_length=max_length, length_penalty=length_penalty, threads=threads,
                                  as_json=json_lines, verbose=verbose, on_start=started,
                                  io_binding=io_binding, attention_cache=attention_cache, spin=spin)
            except OutputError as e:
                raise fail(str(e), OUTPUT_ERROR_EXIT) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except BrokenPipeError:  # `captool run ... | head`: the reader has what it wanted
        sys.stderr.close()
        raise typer.Exit(code=0) from None
    finally:
        started()
    raise typer.Exit(code=code)


def run_on_ray(inputs: list[str], out: Path, *, address: Optional[str], model: Optional[Path], device: str,
               actors: int, threads: Optional[int], **decoding) -> int:
    """`captool run --engine ray`: 0 every input captioned, 1 some failed (their records say why)."""
    if device == "auto":
        device = "cpu"  # a GPU actor is asked for explicitly (--device cuda), so that Ray reserves the GPU
    try:
        with errors_to_exit():
            try:
                from captool.ray.folder import caption_to_folder
            except ImportError as e:
                if (e.name or "").split(".")[0] in ("ray", "pyarrow"):
                    raise MissingExtraError("ray", "ray") from None
                raise
            summary = caption_to_folder(inputs, out, address=address, bundle=model, actors=actors,
                                        cpus_per_actor=float(threads or 1), threads=threads,
                                        gpus_per_actor=1.0 if device == "cuda" else 0.0, device=device, **decoding)
    except KeyboardInterrupt:
        raise fail(f"interrupted; the parts written so far stay in {out}: run the same command to go on", 130) from None
    typer.echo(f"captool: {summary['inputs']} inputs: {summary['written']} written now ({summary['failed']} failed), "
               f"{summary['skipped']} already in {out}; {summary['parts']} parts", err=True)
    return 1 if summary["failed"] else 0


@app.command(name="eval")
def eval_command(
    model: Annotated[Path, typer.Argument(help="A bundle directory (onnxruntime, no torch needed) or a checkpoint "
                                               "run directory (sampled by PyTorch itself, for comparison).")],
    data: Annotated[Path, typer.Option(help="A `captool synth` or COCO captions directory, a captions_*.json, a "
                                            "Karpathy dataset_*.json, or the course's coco.pt (needs torch).")],
    split: Annotated[str, typer.Option(help="Split to caption and score.")] = "val",
    beam_size: Annotated[int, typer.Option(help="Beam width (bundles only; 1 is greedy).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per encoder/decoder batch.")] = 32,
    max_images: Annotated[Optional[int], typer.Option(help="Score only the first N images of the split.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder holding the images, where it is not found "
                                                        "beside the annotations.")] = None,
    tokenizer: Annotated[str, typer.Option(help="auto (PTB when java is on PATH), ptb (pycocoevalcap's, needs "
                                                "java) or simple (captool.vocab.tokenize).")] = "auto",
    meteor: Annotated[bool, typer.Option(help="Also compute METEOR (pycocoevalcap's jar; needs java and ~2 GB). "
                                              "SPICE is not offered: it needs Stanford models downloaded.")] = False,
    device: Annotated[str, typer.Option(help="Bundles: auto, cpu or cuda.")] = "auto",
    predictions: Annotated[Optional[Path], typer.Option(help="Also write the captions as a COCO results file "
                                                             "([{image_id, caption}]).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Caption a dataset split and score it: BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap), fact accuracy on synth data.

    Exit codes: 0 scored, 1 scored but some images could not be read, 2 usage, data or model error.
    """
    with errors_to_exit():
        need("pycocoevalcap.bleu.bleu")
        from captool.evaluation import evaluate, is_bundle, write_predictions

        if not is_bundle(model):
            need("torch")
            need("captool.training")
        report = evaluate(model, data, split=split, beam_size=beam_size, batch_size=batch_size,
                          max_images=max_images, tokenizer=tokenizer, meteor=meteor, image_dir=images,
                          device=device, warn=lambda m: typer.echo(f"captool: warning: {m}", err=True))
        if predictions is not None:
            write_predictions(report, predictions)
    typer.echo(json.dumps(report.to_json()) if as_json else report.table())
    if report.n_skipped:
        raise typer.Exit(code=1)


@app.command(name="bench")
def bench_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle directory to benchmark.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="The checkpoint run directory the bundle was exported "
                                                            "from: PyTorch's figures side by side (needs torch).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the figures into this PNG file.")] = None,
    images: Annotated[int, typer.Option(help="Number of images (synth scenes, or the first of --image-dir).")] = 16,
    repeats: Annotated[int, typer.Option(help="Timed calls per figure (batch 8 and 64: a fifth, at least 3).")] = 20,
    cold: Annotated[bool, typer.Option(help="Measure cold start: whole `captool run` vs PyTorch script processes.")] = True,
    cold_repeats: Annotated[int, typer.Option(help="Cold-start runs per side (the median is reported).")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads for onnxruntime and torch alike "
                                                        "(default: each library's own).")] = None,
    image_dir: Annotated[Optional[Path], typer.Option(help="Benchmark on these image files instead of synth scenes.")] = None,
    pipeline: Annotated[bool, typer.Option(help="Also time `captool run` end to end on generated photos (640×480 and "
                                                "12-megapixel JPEGs, 112-px PNGs) against the model alone.")] = True,
    pipeline_images: Annotated[int, typer.Option(help="Photos per kind for --pipeline (12-megapixel JPEGs: a "
                                                      "32nd of it, at least 1).")] = 256,
    against: Annotated[Optional[str], typer.Option(help="Other engines measured beside captool where installed, "
                                                        "comma-separated: openvino, torch-compile, onnxruntime.")] = None,
    against_bundle: Annotated[Optional[Path], typer.Option(
        help="The contenders run this bundle's graphs (the same model: e.g. the fp32 bundle while BUNDLE is the "
             "int8 one), so each engine is measured at its best.")] = None,
) -> None:
    """Latency, throughput, decoder step and cold start of the runtime vs PyTorch, and the hardware floor."""
    with errors_to_exit():
        if checkpoint is not None:
            need("torch")
            need("captool.training")
        if plot is not None:
            need("matplotlib")
        from captool.benchmarks.bench import bench, table
        from captool.benchmarks.bench import plot as draw

        from captool.benchmarks.contenders import parse_against
        from captool.benchmarks.pipeline import pipeline_counts

        report = bench(bundle, checkpoint, images=images, repeats=repeats, cold=cold,
                       cold_repeats=cold_repeats, threads=threads, image_dir=image_dir,
                       pipeline=pipeline_counts(pipeline_images) if pipeline else None,
                       against=parse_against(against), against_bundle=against_bundle)
        if plot is not None:
            draw(report, plot)
    typer.echo(json.dumps(report) if as_json else table(report))


@app.command("info")
def info_command(
    bundle: Annotated[Optional[Path], typer.Argument(
        help="Bundle directory; default: the bundle shipped with captool.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the summary.")] = False,
) -> None:
    """What a bundle is: cell, dimensions, vocabulary, precision, files and sizes, parity at export, providers here."""
    from captool.models import default_bundle

    from .info import bundle_info, info_text

    with errors_to_exit():
        info = bundle_info(bundle if bundle is not None else default_bundle())
    typer.echo(json.dumps(info) if as_json else info_text(info))


@app.command("conform")
def conform_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle the vectors were made with (models/shapes-attention).")],
    client: Annotated[str, typer.Option("--client", help="Command of the runtime under test: gets BUNDLE as its last "
                                        "argument and image paths on stdin, writes one JSON line per path "
                                        "(docs/bundle-format.md, Conformance).")],
    vectors: Annotated[Path, typer.Option("--vectors", help="Folder of vectors.json and images/.")] = Path("conformance"),
    pixels_only: Annotated[bool, typer.Option("--pixels-only", help="Check the preprocessed pixels only; the client "
                                              "gets no bundle argument.")] = False,
) -> None:
    """Check a runtime against the conformance vectors: pixels of every image, and the tokens (greedy, beam 3)."""
    from .conform import conform

    with errors_to_exit():
        agree, problems = conform(bundle, client, vectors=vectors, pixels_only=pixels_only)
    for line in problems:
        typer.echo(line)
    total = agree + len({p.split(":")[0] for p in problems})
    what = "pixels" if pixels_only else "pixels, greedy and beam-3 tokens"
    typer.echo(f"conformance: {agree} of {total} images agree ({what})")
    if problems:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
