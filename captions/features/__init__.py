"""Feature extraction and the HDF5 feature cache (``FeatureCache``)."""

from captions.features.cache import FeatureCache, FeatureDataset

__all__ = ["FeatureCache", "FeatureDataset"]
