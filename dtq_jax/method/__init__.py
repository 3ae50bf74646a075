"""The method: DTQ's terms and the baselines, and the train step.

attention (AFA's channel attention), losses (array-in/array-out terms),
networks (student, teacher and heads built from a config), step (the
optimizer, the train state, the pure train and eval steps), delta (DELTA's
channel weights), static_ranges (activation ranges kept or calibrated),
learned_params (the learned quantizers' parameters: structure, start,
ranges).
Imports quant, layers, models, data.augment and infra.
"""
