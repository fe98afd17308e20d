"""Studies: does a recipe help? Arms over config keys x seeds, shared upstream work, equal training
budgets, stacked training, paired confidence intervals and verdicts (see bpo_jax.studies.runner).

    python -m bpo_jax.main study --config configs/studies/sweet_spot_scaling.yaml
"""
