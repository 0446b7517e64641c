"""Converters from published PyTorch layouts: diffax reproduces the reference implementations' outputs.

No published file can be fetched here, so tests/reference/make_*_reference.py built small checkpoints in the
original layouts once, in a throwaway environment with torch 2.13.0, diffusers and transformers: every tensor
drawn from a seeded normal, saved as ``.safetensors`` next to the reference implementation's float32 outputs on
fixed inputs (``.npz``). The converters read those files with numpy only, and the Flax networks must reproduce the
stored outputs to float32 round-off.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from diffax.models.autoencoder import AutoencoderKL
from diffax.models.text import CLIPTextTransformer
from diffax.models.convert import autoencoder_kl
from diffax.models.convert import clip as convert_clip
from diffax.models.convert import safetensors_io

DATA = Path(__file__).parent / 'data'
VAE_FILE = DATA / 'autoencoder_kl_tiny.safetensors'
# diffusers AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
TINY_VAE = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, num_groups=4, scaling_factor=0.5)


def _close(actual, desired):
  """float32 round-off: a few ulps of the output's scale through a dozen layers."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


@pytest.fixture(scope='module')
def vae():
  model = AutoencoderKL(**TINY_VAE)
  return model, autoencoder_kl.params_from_diffusers(safetensors_io.read_safetensors(VAE_FILE), model)


def test_autoencoder_reproduces_diffusers(vae):
  model, params = vae
  ref = np.load(DATA / 'autoencoder_kl_tiny.npz')
  posterior = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))(params, ref['x'])  # one program
  _close(np.concatenate([posterior.mean, posterior.logvar], axis=-1), ref['moments'])
  _close(jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))(params, ref['z']), ref['decoded'])
  reconstruction, _ = jax.jit(model.apply)({'params': params}, ref['x'])
  _close(reconstruction, ref['reconstruction'])


def test_autoencoder_accepts_the_pre_0_14_attention_names(vae):
  _, params = vae
  old = {k.replace('.to_q.', '.query.').replace('.to_k.', '.key.').replace('.to_v.', '.value.')
         .replace('.to_out.0.', '.proj_attn.'): v for k, v in safetensors_io.read_safetensors(VAE_FILE).items()}
  assert any('.proj_attn.' in k for k in old)
  converted = autoencoder_kl.params_from_diffusers(old, AutoencoderKL(**TINY_VAE))
  jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_load_autoencoder_refuses_a_file_of_another_configuration(tmp_path):
  with pytest.raises(ValueError, match=r'AutoencoderKL weights do not match.*wrong shape.*'
                                       r'encoder/conv_in/kernel: \(3, 3, 3, 8\) \(expected \(3, 3, 3, 128\)\)'):
    autoencoder_kl.load_autoencoder(VAE_FILE, preset='sd')
  state_dict = safetensors_io.read_safetensors(VAE_FILE)
  state_dict['encoder.extra.weight'] = np.zeros(3, np.float32)
  del state_dict['decoder.conv_out.bias']
  save_file(state_dict, tmp_path / 'edited.safetensors')
  with pytest.raises(ValueError, match=r'missing \(1\): decoder/conv_out/bias; unexpected \(1\): encoder/extra/'):
    autoencoder_kl.load_autoencoder(tmp_path / 'edited.safetensors', preset=None, **TINY_VAE)


def test_missing_weights_give_the_download_command(tmp_path, monkeypatch):
  monkeypatch.delenv(autoencoder_kl.ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError, match=r'(?s)not found at .*absent.safetensors.*curl -L -o '
                                              r'sd-vae-ft-mse.safetensors https://huggingface.co/stabilityai/'
                                              r'sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors'):
    autoencoder_kl.load_autoencoder(tmp_path / 'absent.safetensors', preset='sd')
  with pytest.raises(FileNotFoundError, match=f'set \\${autoencoder_kl.ENV_VAR}'):
    autoencoder_kl.load_autoencoder(preset='sdxl')
  monkeypatch.setenv(autoencoder_kl.ENV_VAR, str(VAE_FILE))
  model, params = autoencoder_kl.load_autoencoder(preset=None, **TINY_VAE)
  assert jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((1, 8, 8, 3)), method='encode_latents'),
                        params).shape == (1, 2, 2, 4)


def test_clip_text_converter_skips_buffers_and_refuses_another_configuration():
  state_dict = safetensors_io.read_safetensors(DATA / 'clip_tiny.safetensors')
  state_dict['text_model.embeddings.position_ids'] = np.arange(77)[None]  # saved by transformers < 4.31
  tiny = dict(vocab_size=588, width=32, num_layers=3, num_heads=4, mlp_dim=64, eos_token_id=587)
  params = convert_clip.text_params_from_transformers(state_dict, CLIPTextTransformer(**tiny))
  assert params['encoder']['layers_2']['self_attn']['q_proj']['kernel'].shape == (32, 32)
  with pytest.raises(ValueError, match=r'CLIP text weights do not match.*missing \(16\): encoder/layers_3/'):
    convert_clip.text_params_from_transformers(state_dict, CLIPTextTransformer(**(tiny | {'num_layers': 4})))
  with pytest.raises(ValueError, match=r'wrong shape.*token_embedding/embedding: \(588, 32\) \(expected '
                                       r'\(49408, 768\)\)'):
    convert_clip.load_text_encoder(DATA / 'clip_tiny.safetensors', preset='vit_l14')


def test_missing_clip_weights_give_the_download_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'(?s)curl -L -o clip-vit-large-patch14.safetensors .*'
                                              r'huggingface.co/openai/clip-vit-large-patch14/resolve/main/'
                                              r'model.safetensors'):
    convert_clip.load_text_encoder(tmp_path / 'clip.safetensors')
