"""Running a search: schedule evaluations, persist every result, resume, train the winner.

The loop is Optuna-like: the evolution (``core.evolution``) proposes, an executor trains and
scores, the loop records each finished evaluation at once and tells the evolution.

* ``config``: ``DataConfig`` (model and data) and ``SearchConfig`` (everything a search depends on);
* ``workbench``: the loaded model, its blocks and the data (``prepare``), the evaluator and the
  budget built on them;
* ``fitness``: the search protocol and the ``Evaluator`` that scores one genome;
* ``executors``: where evaluations run (in-process, a process pool, Ray);
* ``rundir``: the run directory, its files, atomic writes, durable records and the lock;
* ``search``: ``Search``, a thin front over its private workers ``_start`` (load and check),
  ``_optimize`` (the loop) and ``_choose`` (the recommended plan and the search's cost);
* ``final``: the final training of a plan, its test scores and the saved model;
* ``rerank`` and ``tradeoff``: re-ranking the best plans, and the Pareto front's end.
"""
