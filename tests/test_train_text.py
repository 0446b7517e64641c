"""Text-to-digits in the trainer: the real ``python -m diffax.main`` on ``configs/digits_text.py:runlocal`` trains a
text encoder with the U-Net, writes the caption-agreement metrics to the eval JSON, and samples from prompts given
on the command line; bad prompts and impossible text settings are ConfigErrors naming their key."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.data import captions
from diffax.models import text_conditioned
from diffax.trainer import components, config as config_lib
import trainer_runs

CONFIG = f'{trainer_runs.REPO}/configs/digits_text.py:runlocal'
PROMPTS = ('a thin seven', 'a bold zero leaning left', 'a one')


def text_config():
  return config_lib.load_file(trainer_runs.REPO / 'configs' / 'digits_text.py', 'runlocal')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Trains 6 steps (evaluating at the last), then samples the prompts from the final checkpoint."""
  workdir = tmp_path_factory.mktemp('digits_text')
  trainer_runs.run_main(workdir, config=CONFIG)
  sampled = trainer_runs.run_main(workdir, f'sample.prompts={";".join(PROMPTS)}', mode='sample', config=CONFIG)
  return workdir, sampled


def test_training_reports_the_caption_agreement(run):
  workdir, _ = run
  result = json.loads((workdir / 'eval' / 'step_00000006_dpm_solver-4_w1.5.json').read_text())
  metrics, protocol = result['metrics'], result['protocol']
  agreements = ('caption_digit_agreement', 'caption_thickness_agreement', 'caption_slant_agreement')
  assert set(agreements) | {'digits_fd'} <= set(metrics)
  assert all(0.0 <= metrics[k] <= 1.0 for k in agreements) and metrics['digits_fd'] > 0
  assert metrics[agreements[0]] * 32 == round(metrics[agreements[0]] * 32)  # a fraction of the 32 samples
  assert protocol['metric'] == 'captions' and protocol['num_samples'] == 32 and protocol['guidance_scale'] == 1.5
  assert 'test' in protocol['captions']


def test_prompts_from_the_command_line_condition_the_samples(run):
  workdir, sampled = run
  with np.load(workdir / 'samples' / 'samples_step_00000006.npz') as f:
    images, ids = f['images'], f['labels']
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8
  expected = captions.tokenizer()([PROMPTS[i % 3] for i in range(16)])
  np.testing.assert_array_equal(ids, expected)  # the prompts cycle over the grid, as token ids
  assert 'Wrote 16 samples' in sampled.stdout + sampled.stderr


@pytest.mark.parametrize('key,value,match', [
    ('sample.prompts', 'a purple seven', r"\['purple'\]"),
    ('sample.prompts', 'a bold seven leaning right bold seven', 'longer than the text encoder'),
    ('sample.prompts', 'a seven;;a one', 'empty prompt'),
    ('model.text_encoder', 'clip_huge', 'clip_tiny'),
    ('data.name', 'digits', 'captioned data'),
    ('data.num_classes', 10, 'captions, not labels'),
])
def test_bad_text_settings_name_their_key(key, value, match):
  config = text_config()
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match) as error:
    config_lib.validate(config)
  assert error.value.key == key


def test_prompts_need_a_text_model():
  config = config_lib.default_config()
  config.sample.prompts = 'a thin seven'
  with pytest.raises(config_lib.ConfigError, match='model.text_encoder') as error:
    config_lib.validate(config)
  assert error.value.key == 'sample.prompts'


@pytest.mark.parametrize('name,preset', [('unet', 'unet_tiny'), ('dit', 'dit_tiny')])
def test_the_backbone_takes_the_encoders_context(name, preset):
  config = text_config()
  config.model.name, config.model.preset = name, preset
  config_lib.validate(config)
  model = components.build_model(config)
  assert isinstance(model, text_conditioned.TextConditioned)
  assert model.backbone.context_dim == model.text_encoder.width == 64 and model.backbone.num_classes is None
  ids = jnp.asarray(captions.tokenizer()(['a thin seven']))
  params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)),
                                   ids))['params']
  assert set(params) == {'backbone', 'text_encoder'}
  assert params['text_encoder']['embeddings']['token_embedding']['embedding'].shape == (20, 64)
