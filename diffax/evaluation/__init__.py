"""Sample-quality evaluation: the FID Inception network, its verified weights, and FID / IS / KID / precision-recall.

``python -m diffax.evaluation.convert_inception`` makes the weights file once (see ``inception_weights``).
Clips: FVD (``fvd``) in the Kinetics-400 I3D (``i3d``), whose weights ``python -m diffax.evaluation.convert_i3d``
makes once (see ``i3d_weights``).
Text-to-image alignment: the CLIP score (``clip_score``), with weights read from transformers' safetensors.
Perceptual distance: LPIPS-VGG (``lpips.distance``); ``python -m diffax.evaluation.convert_lpips`` makes its weights.
"""

from diffax.evaluation import clip_score
from diffax.evaluation import fvd
from diffax.evaluation import i3d
from diffax.evaluation import i3d_weights
from diffax.evaluation import inception
from diffax.evaluation import inception_weights
from diffax.evaluation import lpips
from diffax.evaluation import lpips_weights
from diffax.evaluation import stats
from diffax.evaluation.fvd import FVDEvaluator
from diffax.evaluation.i3d import InceptionI3d
from diffax.evaluation.i3d_weights import I3DWeights
from diffax.evaluation.i3d_weights import load_i3d_variables
from diffax.evaluation.inception import FIDInceptionV3
from diffax.evaluation.inception import make_feature_fn
from diffax.evaluation.inception_weights import InceptionWeights
from diffax.evaluation.inception_weights import load_inception_variables
from diffax.evaluation.lpips_weights import LpipsWeights
from diffax.evaluation.stats import FeatureStats
from diffax.evaluation.stats import file_sha256
from diffax.evaluation.stats import frechet_distance
from diffax.evaluation.stats import inception_score
from diffax.evaluation.stats import kernel_inception_distance
from diffax.evaluation.stats import load_reference_stats
from diffax.evaluation.stats import precision_recall
from diffax.evaluation.stats import save_reference_stats

__all__ = [
    'FIDInceptionV3', 'FVDEvaluator', 'FeatureStats', 'I3DWeights', 'InceptionI3d', 'InceptionWeights',
    'LpipsWeights', 'clip_score', 'file_sha256', 'frechet_distance', 'fvd', 'i3d', 'i3d_weights', 'inception',
    'inception_score', 'inception_weights', 'kernel_inception_distance', 'load_i3d_variables',
    'load_inception_variables', 'load_reference_stats', 'lpips', 'lpips_weights', 'make_feature_fn',
    'precision_recall', 'save_reference_stats', 'stats'
]
