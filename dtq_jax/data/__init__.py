"""The data: image sources, splits, the input pipeline, augmentation.

sources (image folders, TFDS, Fashion-MNIST files) and tfds_tasks (TFDS
names); splits (per-class subsets, validation, the demo's transfer tasks);
input_pipeline (tf.data decoding and batching), image_cache (decoded images
on disk), augment (on-device crop, flip, normalisation), datasets (a run's
splits as batches). Imports infra only.
"""
