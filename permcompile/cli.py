"""The ``permcompile`` command line.

Every error a user can cause prints one line (``error: ...``) and exits non-zero (2 for usage errors,
1 for failed checks); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import click

from .cli_eval import eval_cmd
from .cli_run import run_command
from .config import STRATEGIES, UPDATES, SearchConfig
from .quantization import QUANT_MODES


def _precheck_optimize(model, calib, seed) -> None:
    """What ``optimize`` can refuse before torch or the model is loaded (a large model takes minutes)."""
    from .precheck import check_calibration_source, check_model_spec, check_seed

    check_seed(seed)
    check_model_spec(model)
    check_calibration_source(calib)


class _Group(click.Group):
    """Click group whose usage errors are one ``error:`` line with exit code 2, like ours."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare command: show its help
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(0)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="permcompile")
def main():
    """permcompile: channel permutations for N:M (2:4) sparse Transformers, folded into the weights."""
    from .timing import map_large_allocations

    map_large_allocations()  # memory freed by a step goes back to the system (see its docstring)


PRUNE_MODES = ("blocks", "all", "none")


def _trt_ranges(pairs) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(batch, seq) MIN,OPT,MAX ranges from ``--trt-profile KEY=MIN,OPT,MAX``."""
    from .errors import UsageError
    from .precheck import check_range

    ranges = {"batch": (1, 1, 8), "seq": (1, 128, 512)}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key.strip() not in ranges:
            raise UsageError(f"--trt-profile expects batch=MIN,OPT,MAX or seq=MIN,OPT,MAX, got {pair!r}")
        ranges[key.strip()] = check_range(text, f"--trt-profile {key.strip()}")
    return ranges["batch"], ranges["seq"]


@main.command()
@click.argument("model")
@click.option("--out", "out", required=True,
              help="Output folder, or X.plan for a TensorRT engine (artifacts go to X/).")
@click.option("--sparsity", default="2:4", show_default=True, help="N:M pattern along each layer's input axis.")
@click.option("--permutation", default="hungarian", show_default=True, type=click.Choice(STRATEGIES.choices()),
              help="Permutation strategy. " + STRATEGIES.help_text() + ".")
@click.option("--criterion", default="wanda", show_default=True, help="Mask criterion: magnitude, wanda or ria.")
@click.option("--calib", default=None,
              help="Calibration data: text file/folder, saved dataset, data file or image folder (default: the "
                   "embedded sample).")
@click.option("--calib-samples", default=32, show_default=True, type=int, help="Number of calibration samples.")
@click.option("--calib-seq-len", default=128, show_default=True, type=int, help="Tokens per calibration sample.")
@click.option("--precision", default="auto", show_default=True,
              help="ONNX/Triton precision. auto = fp16 for a bf16/fp16 checkpoint, fp32 for an fp32 one. TensorRT "
                   "runs 2:4 sparse kernels only in fp16 (or int8/fp8): with fp32 the Triton config leaves "
                   "sparsity off. hf/ always keeps the checkpoint's dtype.")
@click.option("--prune", "prune_mode", default="blocks", show_default=True, type=click.Choice(PRUNE_MODES),
              help="What gets N:M masks: blocks (every linear but the output heads: LM head, pooler, classifier), "
                   "all (heads too) or none (permute and fold only; the model's function is unchanged).")
@click.option("--update", default="obs", show_default=True, type=click.Choice(UPDATES),
              help="After masking, update the kept weights to absorb the pruning error (obs: SparseGPT-style OBS "
                   "then a least-squares refit, block by block on the calibration data; none: mask only).")
@click.option("--quantize", default="none", show_default=True, type=click.Choice(QUANT_MODES.choices()),
              help="8-bit weights and activations of the 2:4 layers, for TensorRT's sparse FP8/INT8 kernels. "
                   + QUANT_MODES.help_text() + ".")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same result).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda[:N]. On cuda, calibration statistics and reconstruction run there one block at a "
                   "time, and the learned strategy's loop and the search strategy's Sinkhorn phase (--search "
                   "steps=N) run there too; the exchange search, export and verification run on the CPU.")
@click.option("--search", "search_pairs", multiple=True, metavar="KEY=VALUE",
              help="Research knob of --permutation search, repeatable; the defaults are the best measured (see "
                   "docs/FINDINGS.md). KEY: " + ", ".join(f.name for f in dataclasses.fields(SearchConfig)) + ".")
@click.option("--residual", default="global", show_default=True,
              help="Residual-stream permutation: global (one for the whole model, folded: zero glue) or per-layer "
                   "(one per reading site, e.g. q/k/v and gate/up of each block; one run-time gather each).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: the search, learned and reconstruction passes each go on from their "
                   "checkpoint; a pass without one starts from the beginning (one note says so).")
@click.option("--trt-profile", "trt_profile", multiple=True, metavar="KEY=MIN,OPT,MAX",
              help="TensorRT engine (--out X.plan) optimisation profile, repeatable: batch=MIN,OPT,MAX (default "
                   "1,1,8) and seq=MIN,OPT,MAX (default 1,128,512).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading pickled .bin weights (unsafe for untrusted files).")
@click.option("--quiet", is_flag=True,
              help="No progress bars, step lines or notes on stderr; warnings, errors and the summary still print.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def optimize(model, out, sparsity, permutation, criterion, calib, calib_samples, calib_seq_len, precision, prune_mode,
             update, quantize, seed, device, search_pairs, residual, resume, trt_profile, force, trust_pickle, quiet,
             debug):
    """Permute, fold, prune to N:M, export and verify MODEL (short name or HF folder).

    Add --debug to any command to see tracebacks instead of one error line.
    """
    def go():
        batch_range, seq_range = _trt_ranges(trt_profile)
        from .config import OptimizeConfig, Sparsity, parse_search

        config = OptimizeConfig(sparsity=Sparsity.parse(sparsity), permutation=permutation, criterion=criterion,
                                precision=precision, prune=prune_mode != "none", calib=calib,
                                calib_samples=calib_samples, calib_seq_len=calib_seq_len, seed=seed,
                                device=local_device(device), prune_embeddings=prune_mode == "all",
                                residual=residual, search=parse_search(search_pairs), update=update,
                                quantize=quantize)
        from .pipeline import optimize as run

        result = run(model, out, config, force=force, batch_range=batch_range, seq_range=seq_range,
                     quiet=quiet or not is_writer(), resume=resume, trust_pickle=trust_pickle)
        if is_writer():  # under torchrun only rank 0 wrote OUT and reports
            _print_summary(result.report)

    from .launch import is_writer, local_device, run_ranked

    run_command(lambda: run_ranked(go, device), debug, precheck=lambda: _precheck_optimize(model, calib, seed))


def _in_memory_checks(checks: list[dict]) -> list[str]:
    """The checks ``optimize`` ran on the model in memory with its calibration inputs (pipeline.py names them
    ``*_calibration``): ``verify`` reads only the written files, so it cannot run them again."""
    return [c["name"] for c in checks if str(c.get("name", "")).endswith("_calibration")]


def _print_summary(report: dict) -> None:
    groups = report.get("groups", [])
    moved = [g for g in groups if g["strategy"] != "none"]
    click.echo(f"model {report['model']}  sparsity {report['sparsity']}  permutation {report['permutation']}  "
               f"criterion {report['criterion']}")
    if moved:
        ki = report.get("kept_importance", {})
        click.echo(f"groups permuted: {len(moved)}/{len(groups)}  kept importance (mean over groups): "
                   f"identity {ki.get('identity', 0):.4f} -> chosen {ki.get('chosen', 0):.4f}")
    cost = report.get("glue_cost") or {}
    glue = f"glue ops: {report.get('glue_ops', 0)}"
    if report.get("glue_ops"):
        glue += (f" (gathers of {cost.get('elements_per_token', 0):,} elements per token, "
                 f"{100 * cost.get('ratio', 0):.3f}% of the linear layers' multiply-adds)")
    click.echo(f"pruned layers: {len(report.get('pruned_layers', []))}  dense: {len(report.get('dense_layers', []))}  "
               + glue)
    recon = [x["reconstruction"] for x in report.get("pruned_layers", []) if "reconstruction" in x]
    if recon:
        before = sum(r["rel_error_mask_only"] for r in recon) / len(recon)
        after = sum(r["rel_error_reconstructed"] for r in recon) / len(recon)
        click.echo(f"reconstruction (update obs): relative layer-output error on the calibration data, mean over "
                   f"{len(recon)} layers: mask only {before:.4f} -> reconstructed {after:.4f}")
        embedded = (report.get("calibration") or {}).get("reconstruction_fit_embedded") or {}
        if embedded:
            click.echo("  the calibration text is one kind of text: the update was also fitted on the embedded mixed "
                       "set (" + ", ".join(f"{v} batches of {k}" for k, v in embedded.items()) + ")")
        held = [r["heldout"] for r in recon if "heldout" in r]
        if held:
            kinds = {"plain": sum(h["choice"] == "shrink=0" for h in held),
                     "shrunk": sum(h["choice"] not in ("shrink=0", "mask") for h in held),
                     "mask alone": sum(h["choice"] == "mask" for h in held)}
            click.echo(f"  on held-out calibration data (fitted without it): mask only "
                       f"{sum(h['rel_error_mask_only'] for h in held) / len(held):.4f} -> reconstructed "
                       f"{sum(h['rel_error_reconstructed'] for h in held) / len(held):.4f}; updates kept: "
                       + ", ".join(f"{v} {k}" for k, v in kinds.items()))
    quant = report.get("quantization")
    if quant:
        rounding = [x["rel_error_rounding"] for x in quant.get("layers", []) if x.get("rel_error_rounding") is not None]
        sites = (quant.get("smoothing") or {}).get("sites") or []
        click.echo(f"quantized {quant['mode']}: {len(quant.get('layers', []))} layers (weights per output channel, "
                   "inputs per tensor, static); "
                   + ("rounded inside the OBS pass (its error is in the reconstruction's)" if quant.get("joint") else
                      f"weight rounding error, mean {sum(rounding) / max(len(rounding), 1):.4f}")
                   + (f"; smoothing folded at {len(sites)} sites" if sites else ""))
    checks = report.get("checks", [])
    in_memory = _in_memory_checks(checks)
    why = (f" ({len(checks) - len(in_memory)} on the written files, which `permcompile verify` re-runs; "
           f"{', '.join(in_memory)} on the model in memory)") if in_memory else ""
    click.echo(f"checks: {sum(c['passed'] for c in checks)}/{len(checks)} passed{why}")
    click.echo("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.get("timings", {}).items()))
    memory = report.get("peak_memory_gib", {})
    if memory:
        top = max(memory, key=memory.get)
        click.echo(f"peak memory: {memory[top]:.2f} GiB (during {top}; every step in report.json peak_memory_gib)")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the coupling groups as JSON.")
@click.option("--residual", default="global", show_default=True,
              help="global, or per-layer to show the reading sites --residual per-layer would permute (2:4 layers).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(model, as_json, residual, debug):
    """Print MODEL's coupling groups: consumers, producers, passengers and pins."""

    def go():
        from .config import RESIDUAL_MODES
        from .errors import UsageError
        from .models import load_model
        from .passes.groups import groups_to_json
        from .pipeline import capture_and_analyze

        if residual not in RESIDUAL_MODES:
            raise UsageError(f"--residual must be one of {', '.join(RESIDUAL_MODES)}, got {residual!r}")
        loaded = load_model(model)
        captured, groups, linears = capture_and_analyze(loaded, 4)  # what optimize sees, for 2:4
        if residual == "per-layer":
            from .passes.glue import split_residual

            groups = split_residual(groups, loaded.model, {i.param for i in linears if i.prune})
        if as_json:
            click.echo(groups_to_json(groups))
            return
        click.echo(f"{loaded.name}: {len(groups)} coupling groups (captured in {captured.seconds:.1f}s)")
        header = (f"{'group':<48} {'kind':<13} {'size':>5} {'cons':>4} {'prod':>4} {'pass':>4} {'blocks':>6} "
                  f"{'fixed':>5}")
        click.echo(header)
        click.echo("-" * len(header))
        for g in groups:
            blocks = len(set(g.blocks)) if g.blocks else 1
            click.echo(f"{g.name[:48]:<48} {g.kind:<13} {g.size:>5} {len(g.consumers):>4} {len(g.producers):>4} "
                       f"{len(g.passengers):>4} {blocks:>6} {len(set(g.fixed)):>5}")
            for pin in g.pins[:3]:
                click.echo(f"    pinned by {pin.op} at {pin.node} ({pin.module or 'top'}): {pin.reason}")
        click.echo("consumers = linears whose input channels move; fixed = channels pinned in place.")

    run_command(go, debug)


@main.command()
@click.argument("out")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify(out, as_json, debug):
    """Re-check an OUT folder: N:M in model.onnx and hf/, file integrity, ONNX Runtime vs torch."""

    def go():
        from pathlib import Path

        from .errors import UsageError, VerificationError
        from .export.verify import format_checks, verify_artifacts

        folder = Path(out)
        if folder.suffix == ".plan":
            folder = folder.with_suffix("")
        if not (folder / "report.json").is_file():
            raise UsageError(f"{out} is not a permcompile output folder (no report.json)")
        checks = verify_artifacts(folder)
        if as_json:
            click.echo(json.dumps([c.__dict__ for c in checks], indent=1))
        else:
            click.echo(format_checks(checks))
            try:
                recorded = json.loads((folder / "report.json").read_text(encoding="utf-8")).get("checks") or []
            except (OSError, ValueError, AttributeError):
                recorded = []
            in_memory = _in_memory_checks(recorded)
            if in_memory:  # why optimize printed more checks than this
                click.echo(f"optimize also ran {', '.join(in_memory)} on the model in memory (report.json: "
                           f"{sum(c.get('passed', False) for c in recorded)}/{len(recorded)} passed); "
                           "verify reads only the files")
        failed = [c for c in checks if not c.passed]
        if failed:
            raise VerificationError(f"{len(failed)} of {len(checks)} checks failed")

    run_command(go, debug)


main.add_command(eval_cmd, "eval")

if __name__ == "__main__":
    main()
