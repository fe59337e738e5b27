"""The ``leanml`` command line."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import LeanmlError

app = typer.Typer(
    name="leanml",
    help="Make models cheaper to run, and prove it with measurements.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
console = Console()


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # leanml never downloads; models come from local paths
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def measurement_table(m, title: str | None = None) -> Table:
    """A two-column table of the figures a person reads first."""
    table = Table(title=title or f"{m.model} on {m.runtime} ({m.threads} threads), priced as {m.hardware}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("parameters", f"{m.params / 1e6:.2f} M" if m.params else "-"),
        ("weights in memory", _fmt_bytes(m.weight_bytes)),
        ("on disk", _fmt_bytes(m.disk_bytes)),
        *(
            [
                (
                    "sparse layers (dense → stored)",
                    f"{m.sparse['sparsity']:.1%} zero; {_fmt_bytes(m.sparse['dense_bytes'])}"
                    f" → {_fmt_bytes(m.sparse['stored_bytes'])}",
                )
            ]
            if getattr(m, "sparse", None)
            else []
        ),
        (f"FLOPs per {m.item}", _fmt(m.flops_per_item and m.flops_per_item / 1e9, ".3f") + " G"),
        (
            f"latency p50 / p95 ({'per decoded token' if m.item == 'token' else f'batch of {m.batch_size}'})",
            f"{m.latency_ms['p50']:.2f} / {m.latency_ms['p95']:.2f} ms",
        ),
        (f"throughput ({m.item}s/s)", _fmt(m.throughput_per_s, ".1f")),
    ]
    if m.decode_tokens_per_s is not None:
        rows += [
            ("prefill tokens/s", _fmt(m.prefill_tokens_per_s, ".1f")),
            ("decode tokens/s (greedy, KV cache)", _fmt(m.decode_tokens_per_s, ".1f")),
            (
                "decode roofline tokens/s (measured bandwidth)",
                f"{_fmt(m.decode_roofline_tokens_per_s, '.1f')} ({_fmt(m.memory_bandwidth_gbs, '.1f')} GB/s); "
                f"{_fmt(m.roofline_fraction and 100 * m.roofline_fraction, '.0f')}% reached",
            ),
        ]
    rows += [
        ("peak resident memory", _fmt_bytes(m.peak_memory_bytes)),
        (f"energy per {m.item}", f"{m.energy_j_per_item:.4g} J ({m.energy_source})"),
        (f"$ per million {m.item}s", f"{m.usd_per_million:.4g} (at ${m.usd_per_hour}/h)"),
    ]
    if m.quality and m.quality.get("metric"):
        rows.append((m.quality["metric"], f"{m.quality['value']:.4f}"))
    for key, value in (m.fidelity or {}).items():
        if not key.startswith("n_"):
            rows.append((f"fidelity: {key}", f"{value:.4f}"))
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command()
def profile(
    model: Annotated[str, typer.Argument(help="built-in name (smollm2-135m, minilm-l6) or a model path")],
    data: Annotated[str | None, typer.Option(help="built-in data name (lee, lee-sim, digits, enwiki) or a path")] = None,
    hardware: Annotated[str | None, typer.Option(help="hardware profile for $ and energy (see `leanml hardware`)")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's)")] = None,
    batch: Annotated[int | None, typer.Option(help="items per timed call (not used by causal LMs: batch 1)")] = None,
    seq_len: Annotated[int | None, typer.Option(help="prompt tokens (causal LMs) or max tokens per text")] = None,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per decode run (causal LMs)")] = 32,
    repeats: Annotated[int | None, typer.Option(help="timed repeats")] = None,
    reference: Annotated[str | None, typer.Option(help="a reference model for label-free fidelity")] = None,
    price_per_hour: Annotated[float | None, typer.Option(help="override the profile's $/hour")] = None,
    runtime: Annotated[str | None, typer.Option(help="torch, torch-compile or onnxruntime (default: as loaded)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps (ONNX Runtime providers follow it)")] = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="write the Measurement JSON here")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing --json file")] = False,
) -> None:
    """Measure a model's cost and quality on a runtime and print it (optionally as JSON)."""
    from .measure import profile as run_profile
    from .outputs import check_file_target, write_file

    if json_path is not None:
        check_file_target(json_path, force, "--json")
    m = run_profile(
        model,
        data=data,
        hardware=hardware,
        threads=threads,
        batch=batch,
        seq_len=seq_len,
        new_tokens=new_tokens,
        repeats=repeats,
        reference=reference,
        price_per_hour=price_per_hour,
        runtime=runtime,
        device=device,
    )
    console.print(measurement_table(m))
    for note in m.notes:
        console.print(f"note: {note}", style="dim")
    if json_path is not None:
        from .outputs import fault_point

        fault_point("profile-before-write")
        write_file(json_path, m.to_json() + "\n", force=force, check=False)
        console.print(f"wrote {json_path}")


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="built-in name or model path")],
    recipe: Annotated[str, typer.Option(help="built-in recipe (w8, w4-g64, w3-g64, w8a8, int8-static, int8-dynamic) or YAML")],
    out: Annotated[Path, typer.Option(help="output folder (refused if it exists and is not empty, unless --force)")],
    data: Annotated[str | None, typer.Option(help="evaluation data (built-in name or path)")] = None,
    calib: Annotated[str | None, typer.Option(help="calibration data (default: the calibration split of --data)")] = None,
    hardware: Annotated[str | None, typer.Option(help="hardware profile for $ and energy")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    repeats: Annotated[int | None, typer.Option(help="timed repeats")] = None,
    runtime: Annotated[
        str, typer.Option(help="runtime the before/after measurements run on: torch, torch-compile, onnxruntime")
    ] = "torch",
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    measure: Annotated[
        bool, typer.Option("--measure/--no-measure", help="measure before and after (--no-measure: only compress and save)")
    ] = True,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="memory the run may use (e.g. 6GB; default: what is available): a model too large for it is "
            "compressed layer by layer from disk, and that run stops with an error if its peak resident memory passes it"
        ),
    ] = None,
    lazy: Annotated[
        bool | None,
        typer.Option(
            "--lazy/--no-lazy",
            help="force (or forbid) layer-by-layer compression of a Hugging Face folder or GGUF file; default: by size",
        ),
    ] = None,
) -> None:
    """Apply a recipe, measure before and after on a runtime, and write the compressed model to --out.

    Under torchrun (torchrun --nproc-per-node N -m leanml.cli compress ...) the calibration windows are
    split across the processes; rank 0 measures and writes."""
    from .accelerate.runtimes import check_runtime
    from .outputs import check_folder_target
    from .pipeline import compress as run_compress

    check_runtime(runtime)
    check_folder_target(out, force)
    result = run_compress(
        model,
        recipe,
        data=data,
        calib=calib,
        out=out,
        force=force,
        hardware=hardware,
        threads=threads,
        repeats=repeats,
        runtime=runtime,
        measure=measure,
        max_memory=max_memory,
        lazy=lazy,
    )
    b, a = result.before, result.after
    if result.out is None:  # a rank other than 0 of a torchrun job
        return
    if b is None or a is None:
        for note in result.notes:
            console.print(f"note: {note}", style="dim")
        if a is not None:
            console.print(f"after: {a.model}: {_fmt_bytes(a.disk_bytes)} on disk", end="")
            if a.quality and a.quality.get("metric"):
                console.print(f", {a.quality['metric']} {a.quality['value']:.4f}", end="")
            console.print(f", {a.throughput_per_s:.1f} {a.item}s/s")
        what = "not measured (--no-measure)" if not measure else "the original's speed was not measured (it was never in memory)"
        console.print(f"wrote {out} (weights, leanml.json, recipe.yaml); {what}")
        return
    table = Table(title=f"{b.model}: recipe {result.recipe.name}")
    for col in ("measure", "before", "after", "after / before"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    rows = [
        ("weights in memory", b.weight_bytes, a.weight_bytes, _fmt_bytes),
        ("on disk", b.disk_bytes, a.disk_bytes, _fmt_bytes),
        (f"throughput ({b.item}s/s)", b.throughput_per_s, a.throughput_per_s, lambda v: f"{v:.1f}"),
        (f"$ per million {b.item}s", b.usd_per_million, a.usd_per_million, lambda v: f"{v:.4g}"),
    ]
    if b.quality and b.quality.get("metric"):
        rows.append((b.quality["metric"], b.quality["value"], a.quality["value"], lambda v: f"{v:.4f}"))
    elif a.fidelity and "mean_cosine" in a.fidelity:  # unlabelled text: the embeddings against the original's
        rows.append(("embedding cosine to the original", 1.0, a.fidelity["mean_cosine"], lambda v: f"{v:.4f}"))
    for name, x, y, fmt in rows:
        table.add_row(name, fmt(x), fmt(y), f"{y / x:.3f}" if x else "-")
    console.print(table)
    where = "quantized compute is simulated in float on the torch runtime" if runtime == "torch" else f"measured on {runtime}"
    for note in result.notes:
        console.print(f"note: {note}", style="dim")
    console.print(f"wrote {out} (model.safetensors, leanml.json, recipe.yaml, before.json, after.json); {where}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="a leanml artifact folder, built-in name or model path")],
    format: Annotated[str, typer.Option("--format", help="onnx, safetensors or gguf")],
    out: Annotated[Path, typer.Option(help="output file (onnx, gguf) or folder (safetensors)")],
    dtype: Annotated[str, typer.Option(help="ONNX weights: fp32 or fp16 (int8/4-bit layers keep their integers)")] = "fp32",
    data: Annotated[str | None, typer.Option(help="calibration data for static int8 ONNX graphs")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Write a (compressed) model as ONNX, safetensors (reloadable by leanml) or GGUF."""
    from .export.formats import check_export_args
    from .export.formats import export as run_export
    from .models import load_model

    check_export_args(format, out, force, dtype)
    handle = load_model(model)
    report = run_export(handle, format, out, force=force, dtype=dtype, data=load_data_arg(data))
    console.print(f"wrote {report.get('path', out)} ({_fmt_bytes(report.get('bytes'))})")
    for entry in report.get("fallback", []):
        console.print(f"note: {entry.get('tensor')} written as {entry.get('type')}: {entry.get('reason')}", style="dim")
    if report.get("fusions"):
        console.print("fusions: " + "; ".join(report["fusions"]), style="dim")


@app.command()
def distill(
    model: Annotated[str, typer.Argument(help="the teacher: built-in name, model path or leanml artifact folder")],
    data: Annotated[str, typer.Option(help="training data: built-in name (enwiki, lee, digits, ...) or a path")],
    out: Annotated[Path, typer.Option(help="output folder for the student (refused if it exists, unless --force)")],
    student: Annotated[
        str, typer.Option(help="drop-layers:R[:influence|every], keep-layers:I,J,.., width:R, joined by '+', or same")
    ] = "drop-layers:0.5",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 200,
    loss: Annotated[str, typer.Option(help="terms joined by '+': kd, task, hidden, relation, attention")] = "kd",
    batch_size: Annotated[int, typer.Option(help="items per optimizer step (all processes together)")] = 8,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per step")] = 1,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = 1e-4,
    temperature: Annotated[float, typer.Option(help="distillation temperature (> 0)")] = 2.0,
    alpha: Annotated[float, typer.Option(help="weight of the task term when combined with kd, in [0, 1]")] = 0.5,
    window: Annotated[int, typer.Option(help="tokens per training window (causal LMs)")] = 256,
    top_k: Annotated[int | None, typer.Option(help="distil only the teacher's top-k logits per token")] = None,
    cache_teacher: Annotated[bool, typer.Option(help="run the teacher once per item and keep its top-k logits")] = False,
    select_fraction: Annotated[float, typer.Option(help="train on this fraction of the items (after de-duplication)")] = 1.0,
    select_by: Annotated[str, typer.Option(help="hard, easy, random or curriculum")] = "hard",
    seed: Annotated[int, typer.Option(help="seed of the data order and initialisation")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints (in OUT.checkpoints)")] = 50,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint of an interrupted run")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
) -> None:
    """Distil a teacher into a smaller student built from it, and write the student to --out."""
    import contextlib
    import json
    import shutil

    from .artifact import write_artifact_files
    from .distill import Distill
    from .distill.api import distill as run_distill
    from .distill.trainer import CHECKPOINT, world
    from .measure.quality import check_data_for
    from .models import load_model
    from .outputs import FolderOutput, check_folder_target, read_marker, write_marker
    from .recipe import Recipe

    ckpt = out.parent / (out.name + ".checkpoints")
    if str(out).strip() and out.name not in ("", ".", ".."):
        if resume and not (ckpt / CHECKPOINT).is_file():
            raise LeanmlError(f"--resume found no checkpoint at {str(ckpt / CHECKPOINT)!r}; run without --resume to start")
        if ckpt.exists() and not resume:
            if not force:
                raise LeanmlError(
                    f"a checkpoint of an interrupted run is in {str(ckpt)!r}; pass --resume to continue it "
                    "or --force to start again from step 0"
                )
            if read_marker(ckpt) is None:
                raise LeanmlError(f"{str(ckpt)!r} holds files leanml did not write; move it away to start again")
    check_folder_target(out, force)
    cfg = Distill(
        student=student,
        loss=loss,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        temperature=temperature,
        alpha=alpha,
        window=window,
        top_k=top_k,
        cache_teacher=cache_teacher,
        select_fraction=select_fraction,
        select_by=select_by,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    train_data = load_data_arg(data)
    teacher = load_model(model)
    check_data_for(teacher, train_data, verb="distill")
    from .measure.cost import weight_bytes
    from .outputs import check_free_space

    if teacher.is_torch:
        need = 2 * weight_bytes(teacher.module)
        check_free_space(out.parent, need, f"the student and its checkpoints at {str(out)!r}")
    if "task" in cfg.terms and teacher.task != "causal-lm" and not _has_labels(train_data):
        raise LeanmlError(f"--loss {loss!r} has a task term, which needs labels; data {train_data.name!r} has none (use kd)")
    rank = world()[0]
    if rank == 0 and ckpt.exists() and not resume:
        shutil.rmtree(ckpt)  # checked above: a folder of leanml's, and --force was given
    writer = FolderOutput(out, "distill", force) if rank == 0 else contextlib.nullcontext()
    with writer as w:
        if rank == 0 and not ckpt.exists():
            ckpt.mkdir(parents=True)
            write_marker(ckpt, "distill-checkpoints", complete=False)
        result = run_distill(teacher, cfg, train_data, checkpoint_dir=ckpt, resume=resume)
        if rank != 0:
            return
        report = result.meta["reports"]["distill.json"]
        extra = {"distill.json": json.dumps(report, indent=2, default=str) + "\n"}
        write_artifact_files(result, w.tmp, recipe=Recipe(name=f"distill {student}", steps=[cfg]), extra=extra)
        w.commit()
    if read_marker(ckpt) is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    table = Table(title=f"{teacher.name} -> student {student}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("parameters (teacher → student)", f"{report['params_teacher']:,} → {report['params_student']:,}")
    table.add_row("training items", str(report.get("selection", {}).get("kept", report.get("dedup", {}).get("kept", "-"))))
    table.add_row("loss (first → last step)", f"{report['first_loss']:.4f} → {report['last_loss']:.4f}")
    table.add_row("wall-clock", f"{report['seconds']:.1f} s ({report['items_per_s']} items/s, {report['processes']} process(es))")
    console.print(table)
    console.print(f"wrote {out} (model.safetensors, leanml.json, distill.json)")


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="built-in name, model path or leanml artifact folder")],
    data: Annotated[str, typer.Option(help="data that judges quality: built-in name (lee, lee-sim, digits) or a path")],
    max_drop: Annotated[str, typer.Option(help="quality the result may lose: 1% or 0.01")] = "1%",
    drop_type: Annotated[
        str, typer.Option(help="relative (fraction of the original's value) or absolute (metric units)")
    ] = "relative",
    objective: Annotated[str, typer.Option(help="usd, latency, size, energy or memory")] = "usd",
    hardware: Annotated[str | None, typer.Option(help="hardware profile for prices and power (see `leanml hardware`)")] = None,
    runtime: Annotated[str, typer.Option(help="auto (search onnxruntime and torch), torch or onnxruntime")] = "auto",
    time_budget: Annotated[str | None, typer.Option(help="wall-clock for the search, e.g. 20m, 1h30m")] = None,
    trials: Annotated[int | None, typer.Option(help="stop after this many trials (all workers together)")] = None,
    candidates: Annotated[str | None, typer.Option(help="other models to consider, comma-separated names or paths")] = None,
    out: Annotated[Path, typer.Option(help="output folder (study, chosen model, report)")] = Path("leanml-optimize"),
    resume: Annotated[bool, typer.Option(help="continue the study in --out (or --storage)")] = False,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL shared by several workers (default: sqlite in --out)")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for measurements")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --out folder")] = False,
    max_memory: Annotated[
        str | None, typer.Option(help="peak memory the serving process may use, e.g. 1.5GB (default: no limit)")
    ] = None,
    min_fidelity: Annotated[
        float | None,
        typer.Option(help="fidelity floor on held-out inputs, 0-1 (default: LMs 0.85 exp(-KL), encoders 0.95 cosine, else 0.9)"),
    ] = None,
) -> None:
    """Search quantization, pruning, distillation and runtimes for the cheapest model within a quality budget."""
    from .search import optimize as run_optimize

    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    result = run_optimize(
        model,
        load_data_arg(data),
        budget=max_drop,
        objective=objective,
        drop_type=drop_type,
        hardware=hardware,
        runtime=runtime,
        time_budget=time_budget,
        trials=trials,
        candidates=cands,
        out=out,
        resume=resume,
        storage=storage,
        force=force,
        threads=threads,
        max_memory=max_memory,
        min_fidelity=min_fidelity,
    )
    s = result.summary
    table = Table(title=f"{s['model']} on {s['data']}: {len(result.trials)} trials in {s['elapsed_s']:.0f} s")
    for col in ("trial", "candidate", "status", f"{s['metric']} (selection)", "drop", "90% upper", s["objective_label"]):
        table.add_column(col, justify="right" if col not in ("candidate", "status") else "left")
    for r in result.trials:
        mark = " *" if r["number"] == s["chosen"] else ""
        table.add_row(
            f"{r['number']}{mark}",
            r.get("label", ""),
            r["status"],
            _fmt(r.get("quality"), ".4g"),
            _fmt(r.get("quality_drop"), ".3g"),
            _fmt((r.get("drop_interval") or {}).get("high"), ".3g"),
            _fmt(r.get("objective"), ".4g"),
        )
    console.print(table)
    if result.chosen is None:
        console.print("no trial completed: nothing chosen (see trials.json for the reasons)")
    else:
        if s["met"]:
            verdict = "within the budget on the test split"
        elif s.get("met_selection"):
            verdict = "within the budget on the selection split but NOT on the test split"
        else:
            verdict = f"budget NOT met (misses by {s['shortfall']:.4g})"
        console.print(f"chosen: trial {s['chosen']}, {result.chosen['label']}: {verdict}")
    console.print(f"report: {out / 'report.html'}")


def _has_labels(data) -> bool:
    return getattr(data, "labels", None) is not None or getattr(data, "y", None) is not None


def load_data_arg(data: str | None):
    if data is None:
        return None
    from .data import load_data

    return load_data(data)


@app.command()
def hardware() -> None:
    """List the hardware profiles (price, power, bandwidth)."""
    from .measure.hardware import DEFAULT_HARDWARE, list_profiles

    table = Table(title=f"hardware profiles (default: {DEFAULT_HARDWARE})")
    for col in ("name", "kind", "$/hour", "watts", "GB/s", "price date"):
        table.add_column(col, no_wrap=True)
    for p in list_profiles().values():
        table.add_row(p.name, p.kind, f"{p.usd_per_hour}", f"{p.power_w:g}", f"{p.memory_bandwidth_gbs:g}", p.price_date)
    console.print(table)


def _os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path."""
    names = [n for n in (exc.filename, exc.filename2) if n]
    where = f" ({' -> '.join(map(str, names))})" if names else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {
        28: "free some space or write elsewhere",  # ENOSPC
        27: "the file would exceed the size this process may write",  # EFBIG
        13: "choose a location you can write",  # EACCES
        30: "the file system is read-only; write elsewhere",  # EROFS
    }.get(exc.errno or 0)
    return f"{reason}{where}" + (f"; {hint}" if hint else "")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line on stderr and exit with code 2; so do failures of the
    operating system (a full disk, a folder that cannot be written, a closed stdout). Anything else is a
    fault of leanml's: one line with exit code 1 (``LEANML_DEBUG=1`` shows the traceback)."""
    _quiet_libraries()
    err = Console(stderr=True, highlight=False)

    def fail(message: str, code: int) -> None:
        with contextlib.suppress(OSError):
            err.print(f"leanml: error: {' '.join(message.split())}", markup=False, soft_wrap=True)
        _silence_stdout()
        sys.exit(code)

    try:
        code = app(args=argv, prog_name="leanml", standalone_mode=False)
        sys.stdout.flush()
    except LeanmlError as exc:
        fail(str(exc), 2)
    except (typer.Abort, KeyboardInterrupt):
        with contextlib.suppress(OSError):
            err.print("leanml: interrupted")
        _silence_stdout()
        sys.exit(130)
    except OSError as exc:
        if os.environ.get("LEANML_DEBUG"):
            raise
        fail(_os_error_line(exc), 2)
    except MemoryError:
        fail("out of memory; try a smaller model, batch or --seq-len, or a machine with more memory", 2)
    except Exception as exc:
        # Usage errors from the command-line parser (a missing argument, a value of the wrong type).
        if getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message"):
            fail(exc.format_message(), 2)
        if os.environ.get("LEANML_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        fail(f"internal error: {type(exc).__name__}: {first} (set LEANML_DEBUG=1 for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail (stdout was /dev/full)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    main()
