"""The pure logic of BioTune, numpy only: nothing here imports torch.

* ``plan``: fine-tuning plans and the genome coding (genes <-> ``FineTunePlan``);
* ``evolution``: the paper's evolutionary algorithm as a seedable ask/tell object;
* ``pareto``: Pareto fronts of validation error against cost, within one fold;
* ``budget``: budgets on what a plan may cost, and the Pareto objective's cost axis;
* ``splits``: stratified splits and folds (controlled rounding of class counts);
* ``cost``: a search's work in FLOPs and FT-equivalents, from per-block FLOPs;
* ``records``: the typed records of a run (``Evaluation``, ``FinalRun``, ``Status``, ``Role``).

Everything else in biotune may import from here; nothing here imports the rest of biotune
(but ``biotune.errors``), so the logic can be read, tested and reused without a model.
"""
