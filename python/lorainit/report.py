"""The result of ``initialize_lora``: per-layer facts, timings and choices, as a table or JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["InitReport"]


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
        layers: one dict per target layer (name, shape, rank, tokens, n_train, eigenvalues, solver
            iterations and residual, time, ...; which keys exist depends on the method).
        info: global facts (n_train source, step-size search scores and the chosen eta, passes, ...;
            ``stats_cache``: ``{"path", "hit", "files", ...}`` with a statistics cache, ``"used": False``
            when the method computes no statistics).
        timings: seconds per phase (statistics pass, kernels inside it, solves, line search, writes, total).
    """

    method: str
    config: Dict[str, Any]
    layers: List[Dict[str, Any]] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    COLUMNS = ("name", "shape", "r", "tokens", "n_train", "eigenvalues", "iters", "residual", "time_s")

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
        for row in self.layers:
            cells = []
            for c in cols:
                if c == "shape":
                    cells.append(f"{row.get('m', '?')}x{row.get('n', '?')}")
                else:
                    cells.append(_short(row.get(c)))
            rows.append(cells)
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(s.ljust(w) for s, w in zip(cells, widths))  # noqa: E731
        out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
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
