"""Small-scale reproductions of the papers' claims (``make experiments``); results in ``results/``."""
