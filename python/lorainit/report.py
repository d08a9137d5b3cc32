"""The result of ``initialize_lora``: per-layer facts, timings and choices, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .lr import check_lora_lr

__all__ = ["InitReport", "thread_hint"]

# The hint about busy CPUs: wall time at least this many times the process's CPU time, over at least
# this many seconds (shorter runs are dominated by start-up noise).
WALL_OVER_CPU = 2.0
MIN_WALL_S = 2.0


def thread_hint(wall_s: float, cpu_s: float, threads: int) -> Optional[str]:
    """A hint when the init's wall time is far above the CPU time the process got (``cpu_s`` from
    ``time.process_time``, all threads): the cores were busy with other work, and torch's threads
    then mostly wait for each other (oversubscription). None when the times look normal."""
    if wall_s < MIN_WALL_S or wall_s < WALL_OVER_CPU * cpu_s:
        return None
    head = (f"the init took {wall_s:.1f} s but the process got only {cpu_s:.1f} s of CPU time with {threads} torch "
            f"thread{'s' if threads > 1 else ''}: the CPU cores are busy with other jobs")
    if threads == 1:
        return head + " (it runs at the speed of the share of a core it gets; docs/performance.md)"
    return (head + " (thread oversubscription can make it several times slower); try torch.set_num_threads(1) "
            "or `lorainit init --num-threads 1` (docs/performance.md)")


def _short(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 4:
            return "[" + ", ".join(_short(x) for x in v[:2]) + f", ... {_short(v[-1])}]"
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


@dataclass
class InitReport:
    """What ``initialize_lora`` did.

    Attributes:
        method: registered method name; config: its configuration as a dict.
        layers: one dict per target layer (name, shape, rank, tokens, n_train, eigenvalues, solver,
            iterations, converged and residual, time, ...; which keys exist depends on the method).
            ``time_s`` is the layer's own solve time, except where ``time_group_size`` (k > 1) says it
            is a 1/k share of a batched call over k layers (the table marks those with ``*``).
        info: global facts (n_train source, step-size search scores and the chosen eta, passes, ...;
            ``stats_cache``: ``{"path", "hit", "files", ...}`` with a statistics cache, ``"used": False``
            when the method computes no statistics; ``cpu_time_s``: the CPU time the process got during
            the call, all threads; ``hint``: only when the cores were busy with other jobs, what to do,
            docs/performance.md).
        timings: seconds per phase (statistics pass, kernels inside it, solves, line search, writes, total).
    """

    method: str
    config: Dict[str, Any]
    layers: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    # The raw eigenvalues of Omega stay in the JSON: their scale (e.g. -4e7) says nothing at a glance.
    COLUMNS = ("name", "shape", "r", "tokens", "n_train", "solver", "iters", "converged", "residual",
               "preheat_rank", "quant", "requant_error", "init_weight_error", "time_s")

    @classmethod
    def from_json(cls, source: Union[str, Path]) -> "InitReport":
        """The report that :meth:`to_json` wrote: from a file path, or from the JSON text itself."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        missing = [k for k in ("method", "config") if k not in data]
        if missing:
            raise ValueError(f"InitReport.from_json: not a lorainit report (no {missing})")
        return cls(method=data["method"], config=data["config"], layers=list(data.get("layers", [])),
                   info=dict(data.get("info", {})), timings=dict(data.get("timings", {})))

    @property
    def lr_scale(self) -> Optional[float]:
        """The factor to apply to the learning rate you would use with plain LoRA (1.0 for ``"lora"``).

        From the weight-space size of one Adam step under this init against plain LoRA's
        (:mod:`lorainit.lr`). A hint, not a tuned rate: against the SmolLM2 learning-rate sweep it
        points the right way for PiSSA but asks too low a rate for random-A inits (gaussian,
        orthogonal); docs/learning-rate.md has the validation table.
        None when the init's first step moves no weight (``info["lr_scale"]["reason"]``).
        """
        value = (self.info.get("lr_scale") or {}).get("value")
        return None if value is None else float(value)

    def suggest_lr(self, lora_lr: float) -> float:
        """``lora_lr * lr_scale``: the rate for this init, given the one tuned for plain LoRA."""
        lr = check_lora_lr(lora_lr)
        if self.lr_scale is None:
            reason = (self.info.get("lr_scale") or {}).get("reason", "the report has no lr_scale")
            raise ValueError(f"suggest_lr: no learning-rate scale for method {self.method!r}: {reason}")
        return lr * self.lr_scale

    def layer(self, name: str) -> Dict[str, Any]:
        for row in self.layers:
            if row["name"] == name:
                return row
        raise KeyError(f"no layer {name!r} in the report; layers: {[r['name'] for r in self.layers][:5]}...")

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "config": self.config, "info": self.info, "timings": self.timings,
                "layers": self.layers}

    def to_json(self, path: Optional[Union[str, Path]] = None, **kwargs) -> str:
        """The report as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=str, **kwargs)
        if path is not None:
            Path(path).write_text(text)
        return text

    save = to_json

    def table(self) -> str:
        cols = [c for c in self.COLUMNS if any(c in row or c == "shape" for row in self.layers)]
        rows = []
        shares = False
        for row in self.layers:
            cells = []
            for c in cols:
                v = row.get(c)
                if c == "shape":
                    cells.append(f"{row.get('m', '?')}x{row.get('n', '?')}")
                elif c == "converged" and isinstance(v, bool):
                    cells.append("yes" if v else "NO")
                elif c == "iters" and v == 0 and row.get("solver") in ("eigh", "none"):
                    cells.append("-")  # a dense solve has no iterations
                elif c == "time_s" and v is not None and (row.get("time_group_size") or 1) > 1:
                    cells.append(_short(v) + "*")
                    shares = True
                else:
                    cells.append(_short(v))
            rows.append(cells)
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(s.ljust(w) for s, w in zip(cells, widths))  # noqa: E731
        out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
        if shares:
            out.append("* time_s: an even share of one batched call over several layers (time_group_size)")
        return "\n".join(out)

    def __str__(self) -> str:
        head = [f"lorainit: method={self.method}, {len(self.layers)} layers"]
        for k, v in self.info.items():
            head.append(f"  {k}: {_short(v) if not isinstance(v, dict) else json.dumps(v, default=str)}")
        if self.timings:
            head.append("  timings (s): " + ", ".join(f"{k}={v:.3g}" for k, v in self.timings.items()))
        return "\n".join(head) + "\n" + self.table()

    def print(self) -> None:
        print(str(self))
