"""The trainer: ``train`` fits a registered decoder from a feature cache, in phases (cross-entropy,
then self-critical), resumably; see ``captions.trainer.train``."""
