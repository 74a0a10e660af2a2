"""The ``lightning-reg`` command: which regularizer helps, and by how much.

Modules: :mod:`.data` (MNIST-1D, generated locally, and two scikit-learn datasets, as
in-memory tensors with train/validation/test splits), :mod:`.model` (the MNIST-1D MLP, small
residual CNNs and the Lightning module that trains them), :mod:`.techniques` (the registry:
name → class, formula, paper, strength grid, factory), :mod:`.stats` (confidence intervals,
paired tests, strength selection), :mod:`.ablation` (the runner), :mod:`.config` (``--config``:
the user's own LightningCLI YAML), :mod:`.report` (tables and figures) and :mod:`.cli` (the
console script).
"""
