"""Datasets and input pipelines: random-access sources (digits, TFDS) and checkpointable per-process iterators."""

from diffax.data.digits import NUM_CLASSES
from diffax.data.digits import load_digits
from diffax.data.pipeline import make_iterator
from diffax.data.sources import DatasetNotPreparedError
from diffax.data.sources import DigitsSource
from diffax.data.sources import Source
from diffax.data.sources import TfdsSource
from diffax.data.sources import get_source

__all__ = [
    'DatasetNotPreparedError', 'DigitsSource', 'NUM_CLASSES', 'Source', 'TfdsSource', 'get_source', 'load_digits',
    'make_iterator'
]
