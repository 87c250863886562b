"""Training data: the synthetic MNI152-derived subjects (`mni152`) that the shipped models are trained on."""
