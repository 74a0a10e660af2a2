"""The ``lightning-reg`` command: an ablation of every technique on a bundled real dataset.

Modules: :mod:`.data` (scikit-learn datasets as in-memory tensors), :mod:`.model` (a compact
residual CNN / MLP with BatchNorm and the Lightning module that trains it), :mod:`.techniques`
(the registry: name → description, formula, paper, factory), :mod:`.ablation` (the runner),
:mod:`.report` (tables and figures) and :mod:`.cli` (the console script).
"""
