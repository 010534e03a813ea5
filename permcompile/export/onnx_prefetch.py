"""Tracing the ONNX graph in a forked process while the weights are being compressed.

The trace depends only on the architecture and the example inputs, not on the weights' values: a child
forked before compression traces it and streams the graph back; export then only writes the final weights.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .onnx_trace import _check_args, _export_module, _one_line, _trace, _Traced, ExportWrapper
from .onnx_write import _STREAM_MARK

class GraphPrefetch:
    """Trace a model's ONNX graph in a forked process while the parent changes the model's weights.

    Why: the trace (torch.export, decompositions, translation) is most of an export's cost, yet the
    graph does not depend on weight values, and permcompile never changes a model's structure (folding
    and masking only rewrite weights). So ``optimize`` starts the trace right after loading, in a child
    process (fork: the child sees the loaded model without copying it), and binds the final weights by
    name when it is time to export. The child saves the unoptimised graph to ``workdir`` with a data-less
    reference in place of every initializer that is a parameter or buffer of the model; the parent binds
    the model's current tensor to each of them. Anything unexpected (no ``fork`` on this platform, a failed
    child, a name or shape that does not match) makes :meth:`take` return ``None`` with a reason, and the
    export traces the model itself; the numerical checks after export cover the result either way.
    """

    def __init__(self, model: nn.Module, example_kwargs: Mapping[str, Tensor], precision: str = "fp32",
                 forward_kwargs: Mapping[str, Any] | None = None, *, workdir: str | Path,
                 fp16_method: str = "auto", opset: int | None = None):
        import multiprocessing as mp

        _check_args(model, example_kwargs, precision, fp16_method, "fast")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.precision, self.fp16_method, self.opset = precision, fp16_method, opset
        self.names = list(example_kwargs)
        self.process = None
        self.error: str | None = None
        self.stages: dict[str, float] = {}
        if "fork" not in mp.get_all_start_methods():
            self.error = "this platform cannot fork"
            return
        ctx = mp.get_context("fork")
        # one core for the child: an oversubscribed OpenMP pool spin-waits and slows both processes down
        self._threads = torch.get_num_threads()
        if self._threads > 1:
            torch.set_num_threads(self._threads - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Python 3.12+ warns about fork with threads alive
            self.process = ctx.Process(target=_prefetch_child, name="permcompile-onnx-trace", daemon=True,
                                       args=(model, dict(example_kwargs), precision, forward_kwargs, fp16_method,
                                             opset, str(self.workdir)))
            self.process.start()
        self._watch_child()

    def _watch_child(self) -> None:
        """Give the child's core back when the child exits, not at export: the trace takes a minute or two, the
        compression after it much longer, and on two cores it ran on one thread throughout (a 6-layer 1B-shape
        run: 399 s per reconstructed block, the process at 100 % of one core, the trace child long done).

        SIGCHLD's handler runs in the main thread between two bytecodes, where ``torch.set_num_threads`` is
        safe (OpenMP's thread count belongs to the calling thread, so a watcher thread could not set it). Only
        in the main thread, and only where nobody handles SIGCHLD already; else the threads come back at export
        as before."""
        import signal
        import threading

        self._sigchld = None
        if (not getattr(self, "_threads", None) or self._threads <= 1 or not hasattr(signal, "SIGCHLD")
                or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGCHLD) is not signal.SIG_DFL):
            return

        def on_child(signum, frame):
            if self.process is None or not self.process.is_alive():  # another child's exit is not ours
                self._restore_threads()

        self._sigchld = signal.signal(signal.SIGCHLD, on_child)
        if not self.process.is_alive():  # it exited before the handler was in place
            self._restore_threads()

    def cancel(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = None
        self._restore_threads()

    def _restore_threads(self) -> None:
        threads = getattr(self, "_threads", None)
        if threads:
            torch.set_num_threads(threads)
            self._threads = None
        previous = getattr(self, "_sigchld", None)
        if previous is not None:
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGCHLD, previous)
                self._sigchld = None

    def take(self, model: nn.Module, names: list[str], precision: str, fp16_method: str, optimize: str,
             opset: int | None, in_place: bool = False) -> tuple[_Traced | None, str | None]:
        """Wait for the child and bind ``model``'s weights; (None, reason) if the graph cannot be used.
        ``in_place``: the weights may be cast to the graph's dtype in ``model`` itself (no copy)."""
        try:
            return self._take(model, names, precision, fp16_method, optimize, opset, in_place)
        except Exception as exc:  # noqa: BLE001 - any surprise: trace in the parent instead
            return None, f"traced again: prefetched graph unusable ({_one_line(exc)})"
        finally:
            self.cancel()

    def _take(self, model, names, precision, fp16_method, optimize, opset, in_place=False):
        import json

        if (names, precision, fp16_method, opset) != (self.names, self.precision, self.fp16_method, self.opset) \
                or optimize == "full":
            return None, "traced again: export options differ from the prefetched graph's"
        if self.process is None:
            return None, f"traced again: no prefetched graph ({self.error})"
        waited = time.perf_counter()
        self.process.join()
        self.stages["prefetch_wait"] = round(time.perf_counter() - waited, 3)
        self._restore_threads()
        meta_file = self.workdir / "meta.json"
        if self.process.exitcode != 0 or not meta_file.is_file():
            err = self.workdir / "error.txt"
            why = err.read_text().strip() if err.is_file() else f"exit code {self.process.exitcode}"
            return None, f"traced again: the prefetch failed ({why[:300]})"
        meta = json.loads(meta_file.read_text())
        import onnx_ir as ir

        ir_model = ir.load(str(self.workdir / "graph.onnx"))
        module = _export_module(model, meta["method"], in_place)
        wrapper = ExportWrapper(module, names, None)
        state = dict(wrapper.named_parameters(remove_duplicate=False))
        state.update(dict(wrapper.named_buffers(remove_duplicate=False)))
        inits = ir_model.graph.initializers
        bound = {}
        for name in meta["state_initializers"]:
            tensor = state.get(name)
            value = inits.get(name)
            if tensor is None or value is None:
                return None, f"traced again: {name} is missing from the model or the prefetched graph"
            if tuple(value.shape) != tuple(tensor.shape) or str(value.dtype) != meta["dtypes"][name]:
                return None, f"traced again: {name} changed shape or dtype since the prefetch"
            bound[name] = tensor.detach()
        extra = [n for n in inits if n in state and n not in bound]
        if extra:
            return None, f"traced again: unexpected initializers {extra[:3]}"
        program = torch.onnx.ONNXProgram(ir_model, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program.apply_weights(bound)
        axes = {n: {int(k): v for k, v in ax.items()} for n, ax in meta["axes"].items()}
        return _Traced(program, module, names, axes, meta["out_name"], meta["method"], meta["notes"]), None


def _hollow_(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating parameter of the child's copy of ``model`` fresh, never written storage in the
    graph's dtype. The trace needs shapes and dtypes, not values (the parent binds its own weights by name),
    so the child neither casts a copy of the weights nor keeps the parent's pages: large ``torch.empty``
    blocks are mapped lazily and cost no resident memory."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = torch.empty(param.shape, dtype=dtype)


def _prefetch_child(model, example_kwargs, precision, forward_kwargs, fp16_method, opset, workdir) -> None:
    """Body of the prefetch process: trace, save the graph (parameters as data-less references) and meta.json."""
    import json
    import os
    import sys

    workdir = Path(workdir)
    code = 0
    try:
        torch.set_num_threads(1)  # the parent keeps computing meanwhile
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        _hollow_(model, torch.float16 if precision == "fp16" and fp16_method != "convert" else torch.float32)
        traced = _trace(model, example_kwargs, precision, forward_kwargs, fp16_method, opset, torch_optimize=False)
        wrapper = ExportWrapper(traced.module, traced.names, None)
        state = {n for n, _ in wrapper.named_parameters(remove_duplicate=False)}
        state |= {n for n, _ in wrapper.named_buffers(remove_duplicate=False)}
        import onnx_ir as ir

        inits = traced.program.model.graph.initializers
        names = sorted(n for n in inits if n in state)
        dtypes = {n: str(inits[n].dtype) for n in names}
        for n in names:  # the parent binds its own tensors: save only a data-less reference for these
            t = inits[n].const_value
            inits[n].const_value = ir.ExternalTensor(_STREAM_MARK + n, offset=0, length=t.nbytes, dtype=t.dtype,
                                                     shape=t.shape, name=n)
        ir.save(traced.program.model, str(workdir / "graph.onnx"))
        meta = {"out_name": traced.out_name, "method": traced.method, "notes": traced.notes,
                "axes": traced.axes, "state_initializers": names, "dtypes": dtypes}
        (workdir / "meta.json.tmp").write_text(json.dumps(meta))
        os.replace(workdir / "meta.json.tmp", workdir / "meta.json")
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent through a file
        try:
            (workdir / "error.txt").write_text(f"{type(exc).__name__}: {_one_line(exc)}")
        except Exception:  # noqa: BLE001
            pass
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)
