"""Converter error against the stored references: diffax on the converted seeded checkpoints vs the outputs that
diffusers / transformers produced for them (tests/reference/make_*_reference.py), in float32.

  python experiments/convert_error.py [--out experiments/results/convert_error.md]

Prints one row per output: the largest absolute error, the output's largest magnitude and their ratio.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from diffax.evaluation import clip_score
from diffax.models.autoencoder import AutoencoderKL
from diffax.models.convert import autoencoder_kl, clip, safetensors_io

DATA = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'data'
TINY_VAE = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, num_groups=4, scaling_factor=0.5)
TEXT = dict(vocab_size=588, width=32, num_layers=3, num_heads=4, mlp_dim=64, eos_token_id=587)
VISION = dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


def rows() -> list[tuple[str, str, float, float]]:
  out = []
  ref = np.load(DATA / 'autoencoder_kl_tiny.npz')
  vae = AutoencoderKL(**TINY_VAE)
  params = autoencoder_kl.params_from_diffusers(safetensors_io.read_safetensors(
      DATA / 'autoencoder_kl_tiny.safetensors'), vae)
  posterior = vae.apply({'params': params}, ref['x'], method='encode')
  out.append(('AutoencoderKL (diffusers)', 'encoder moments', np.concatenate([posterior.mean, posterior.logvar], -1),
              ref['moments']))
  out.append(('AutoencoderKL (diffusers)', 'decoder(z)', vae.apply({'params': params}, ref['z'], method='decode'),
              ref['decoded']))
  out.append(('AutoencoderKL (diffusers)', 'reconstruction', vae.apply({'params': params}, ref['x'])[0],
              ref['reconstruction']))
  ref = np.load(DATA / 'clip_tiny.npz')
  for hidden_state, key in (('final', 'last_hidden_state'), ('penultimate', 'penultimate'),
                            ('penultimate_norm', 'penultimate_norm')):
    model, p = clip.load_text_encoder(DATA / 'clip_tiny.safetensors', preset=None, hidden_state=hidden_state, **TEXT)
    encoding = jax.jit(model.apply)({'params': p}, ref['input_ids'])
    out.append(('CLIPTextModel (transformers)', f'context ({hidden_state})', encoding.context, ref[key]))
  out.append(('CLIPTextModel (transformers)', 'pooled', encoding.pooled, ref['text_pooled']))
  model, p = clip_score.load_clip(DATA / 'clip_tiny.safetensors', preset=None, text_fields=TEXT,
                                  vision_fields=VISION, projection_dim=16)
  out.append(('CLIPModel (transformers)', 'text embeds', model.apply({'params': p}, ref['input_ids'],
                                                                       method='encode_text'), ref['text_embeds']))
  out.append(('CLIPModel (transformers)', 'image embeds', model.apply({'params': p}, ref['pixels'],
                                                                        method='encode_image'), ref['image_embeds']))
  return [(net, name, float(np.abs(np.asarray(a) - b).max()), float(np.abs(b).max())) for net, name, a, b in out]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  lines = ['| reference | output | max abs error | max abs value | ratio |', '|---|---|---:|---:|---:|']
  lines += [f'| {net} | {name} | {err:.2e} | {scale:.2f} | {err / scale:.1e} |' for net, name, err, scale in rows()]
  table = '\n'.join(lines)
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(f'Converter error vs the stored references ({jax.devices()[0].platform}, '
                                      f'float32; `python experiments/convert_error.py`).\n\n{table}\n')


if __name__ == '__main__':
  main()
