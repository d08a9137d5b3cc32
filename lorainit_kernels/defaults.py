"""One source of LoRA-DA's numerical defaults (docs/math.md).

``lk.guidance_matrix``, ``lk.lora_da_factors``, ``lorainit_kernels.methods.lora_da`` and
``lorainit.LoRADAConfig`` all read their defaults from here, so the low-level API and
``initialize_lora`` compute the same ``A`` on the same statistics. This module imports nothing.

* ``DAMPING``: relative damping ``delta`` of ``Z`` and ``s``
  (``Z_d = Z + delta mean(diag Z) I``, ``s_d = s + delta mean(s)``).
* ``BIAS_WEIGHT`` / ``VARIANCE_WEIGHT`` / ``FISHER``: alpha, beta and whether the step is the
  K-FAC Fisher step (the paper's full method).
* ``NORMALIZE_STEP``: the step is ``eta dW A A^T / sigma_max(dW)`` per layer (as the public
  reference code does), so ``eta`` is a spectral norm relative to the layer's own step.
* ``STEP_SCALE``: the fixed step ``eta`` used where no held-out data can score one (the
  tensor-level functions); ``initialize_lora`` searches ``STEP_GRID`` by default.
* ``STEP_GRID``: the etas ``step_scale="auto"`` scores besides ``eta = 0``.

Evidence (``bench/experiments/results/smollm2_step_research.md``): the raw Fisher step is 81x-275x
``||W||_F`` on SmolLM2-135M (every raw eta >= 1e-3 raised its held-out loss from 2.35 to 5-30)
while digits wants eta ~0.3: 3.5 decades apart. Normalized by ``sigma_max(dW)``, the optimum is
eta ~1 on SmolLM2 (held-out loss 1.57 vs the untouched 2.35, damping 0.1) and eta 3-10 on digits,
so one grid ``{0.3, 1, 3, 10}`` serves both; damping 0.1 gave the lowest losses on both.
* ``SOLVER``: the eigensolver for ``A``; ``"auto"`` is dense ``torch.linalg.eigh`` for
  ``n < EIGH_CROSSOVER_N[device type]`` and LOBPCG above (``"eigh"`` / ``"lobpcg"`` force one).
* ``EIGH_CROSSOVER_N``: the matrix size from which LOBPCG (k = 8 smallest pairs, fp32, realistic
  Omega) beats batched dense ``eigh``, per device type. ``"cpu"``: 768, measured on the 2-core
  development CPU by ``bench/bench_lobpcg.py``'s crossover sweep on 2026-12-02 with the verified,
  degenerate-safe solver and its default Chebyshev polynomial preconditioner (LOBPCG 0.84x eigh at
  n=512, 1.51x at 768, 3.1x at 1024, 7.7x at 2048; batch 2, ``bench/results/lobpcg.md``; without
  the preconditioner it was 1536). ``"cuda"``: NOT measured (no GPU run yet); a guess from dense
  ``eigh`` being poorly parallel on GPUs while LOBPCG's thin products are bandwidth-bound. Other
  device types use the ``"cuda"`` value.
"""

DAMPING = 0.1
BIAS_WEIGHT = 1.0
VARIANCE_WEIGHT = 1.0
FISHER = True
NORMALIZE_STEP = True
STEP_SCALE = 1.0
STEP_GRID = (0.3, 1.0, 3.0, 10.0)
SOLVER = "auto"
EIGH_CROSSOVER_N = {"cpu": 768, "cuda": 512}
