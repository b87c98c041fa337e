"""Images in: data sets and the built-in shapes (datasets), the two-view augmentations (views),
seeded per-sample views and bad-image replacement (sampling), the pretraining pipeline
(pipeline)."""
