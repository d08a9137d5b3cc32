"""svd_of_product (QR of both factors + SVD of the R x R core) vs SVD of the formed m x n product."""
from __future__ import annotations

import torch

from bench.common import timeit


def run(quick: bool = False) -> dict:
    import lorainit_kernels as lk

    g = torch.Generator().manual_seed(0)
    shapes = [(512, 512, 64, 16)] if quick else [(1024, 1024, 128, 16), (4096, 4096, 256, 16)]
    rows = []
    for m, n, R, k in shapes:
        B = torch.randn(m, R, generator=g)
        A = torch.randn(R, n, generator=g)
        ref = torch.linalg.svdvals((B.double() @ A.double()))[:k]
        fns = {
            "lorainit.svd_of_product": lambda: lk.svd_of_product(B, A, k),
            "torch.linalg.svd(B @ A)": lambda: torch.linalg.svd(B @ A, full_matrices=False),
        }
        res = {}
        for name, fn in fns.items():
            S = fn()[1][:k]
            err = float(((S.double() - ref).abs() / ref[0]).max())
            t = timeit(fn, repeats=3 if quick else 2, warmup=0)
            res[name] = t["median"]
            rows.append({"provider": name, "m": m, "n": n, "R": R, "k": k, "median_s": t["median"],
                         "q25_s": t["q25"], "q75_s": t["q75"], "sv_rel_err": err})
        for r in rows[-2:]:
            r["speedup_vs_svd"] = res["torch.linalg.svd(B @ A)"] / r["median_s"]
    return {"title": "svd_of_product vs SVD of the formed product, fp32, CPU",
            "columns": ["provider", "m", "n", "R", "k", "median_s", "q25_s", "q75_s", "speedup_vs_svd", "sv_rel_err"],
            "rows": rows, "notes": ["sv_rel_err = max |S - S_ref| / S_ref[0], S_ref from float64 svdvals of the product."]}
