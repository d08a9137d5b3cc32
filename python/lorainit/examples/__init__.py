"""Demo tasks built on the library (imported on demand; this package imports none of them).

* :mod:`~lorainit.examples.digits`: the LoRA-DA paper's Appendix E task at small scale
  (scikit-learn's bundled 8x8 digits).
* :mod:`~lorainit.examples.digits_demo`: ``lorainit demo`` / ``make demo``, every init on that task.
"""
