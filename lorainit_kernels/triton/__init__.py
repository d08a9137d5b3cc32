"""GPU kernels written in Triton; verified on CPU under ``TRITON_INTERPRET=1``. Optional at import."""
