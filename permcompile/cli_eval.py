"""``permcompile eval``: quality of an optimized model (perplexity, embedding / feature similarity, top-1).

Registered in :mod:`permcompile.cli` with ``main.add_command(eval_cmd, "eval")``; errors are reported by
:func:`permcompile.cli_run.run_command` like every command's.
"""
from __future__ import annotations

import json
import math

import click

from .cli_run import run_command


class _no_loading_bars:
    """Silence transformers' "Loading weights" progress bar (stderr noise around a one-line error)."""

    def __enter__(self):
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover
            self._hf = None
            return self
        self._hf = hf_logging
        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._hf is not None and self._was:
            self._hf.enable_progress_bar()
        return False


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@click.command("eval")
@click.argument("target")
@click.option("--data", required=True,
              help="Text file or folder of .txt (language models), image folder (vision models; class subfolders "
                   "give top-1 for classifiers).")
@click.option("--reference", default=None,
              help="Dense reference model (short name or HF folder). Encoders and vision models are compared with it "
                   "(default: the model the output folder was made from); for causal LMs it adds the reference's "
                   "perplexity, KL(reference || model) per token and next-token top-1 agreement.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]),
              help="Run OUT/hf with torch or OUT/model.onnx with ONNX Runtime.")
@click.option("--context", default=512, show_default=True, type=int, help="Perplexity window in tokens.")
@click.option("--stride", default=None, type=int, help="Perplexity window step (default: the context, no overlap).")
@click.option("--max-tokens", default=None, type=int, help="Score only the first N tokens of the text.")
@click.option("--labels", default=None, help="Classifiers: folder of class subfolders of images (top-1 accuracy).")
@click.option("--family", default=None, type=click.Choice(["causal-lm", "encoder", "vision"]),
              help="Override the model family.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_cmd(target, data, reference, backend, context, stride, max_tokens, labels, family, as_json, quiet, debug):
    """Measure TARGET (an optimize OUT folder, an HF folder or a short name) on --data."""

    def go():
        from .evaluate import evaluate, format_result

        with _no_loading_bars():
            result = evaluate(target, data, reference=reference, family=family, context=context,
                              max_tokens=max_tokens, backend=backend, labels=labels, stride=stride,
                              progress=not quiet)
        if not quiet:
            for note in result.get("notes", []):
                click.echo(f"note: {note}", err=True)
        if as_json:
            click.echo(json.dumps(_jsonable(result), indent=1, sort_keys=True))
        else:
            click.echo(format_result(result))

    run_command(go, debug)
