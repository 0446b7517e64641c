"""Datasets and input pipelines: random-access sources (digits, moving digits, tones, TFDS images, clips and
waveforms) and checkpointable per-process iterators."""

from diffax.data.digits import NUM_CLASSES
from diffax.data.digits import load_digits
from diffax.data.moving_digits import MovingDigitsSource
from diffax.data.pipeline import make_iterator
from diffax.data.sources import DatasetNotPreparedError
from diffax.data.sources import DigitsSource
from diffax.data.sources import Source
from diffax.data.sources import SourceConfigError
from diffax.data.sources import TfdsSource
from diffax.data.sources import get_source
from diffax.data.tones import TonesSource

__all__ = [
    'DatasetNotPreparedError', 'DigitsSource', 'MovingDigitsSource', 'NUM_CLASSES', 'Source', 'SourceConfigError',
    'TfdsSource', 'TonesSource', 'get_source', 'load_digits', 'make_iterator'
]
