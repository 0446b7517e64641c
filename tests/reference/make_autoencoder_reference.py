"""Makes tests/data/autoencoder_kl_tiny.{safetensors,npz}: a seeded diffusers AutoencoderKL and its outputs.

Run once, in a throwaway environment (torch and diffusers are never diffax dependencies)::

  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 diffusers safetensors
  /tmp/refenv/bin/python tests/reference/make_autoencoder_reference.py

The network is diffusers' own ``AutoencoderKL`` (SD's VAE blocks at a tiny width: block_out_channels (8, 16, 16),
one ResNet block per level, 4 groups, 4 latent channels, factor 4) with every tensor drawn from a seeded normal,
so that a transposed kernel or a swapped scale/bias cannot pass. Its outputs on fixed inputs, in float32:
``moments`` (the encoder + quant_conv output, [B, H/4, W/4, 8] NHWC), ``decoded`` (decoder(z) of a fixed z) and
``reconstruction`` (decoder(mean)).
"""

import os

from diffusers import AutoencoderKL
import numpy as np
from safetensors.torch import save_file
import torch

CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=4, down_block_types=('DownEncoderBlock2D',) * 3,
              up_block_types=('UpDecoderBlock2D',) * 3, scaling_factor=0.5)
OUT = os.path.join(os.path.dirname(__file__), '..', 'data')


def main():
  torch.manual_seed(0)
  model = AutoencoderKL(**CONFIG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 3, 16, 16)).astype(np.float32)
  z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    moments = model.quant_conv(model.encoder(torch.from_numpy(x)))
    decoded = model.decode(torch.from_numpy(z)).sample
    mean = model.encode(torch.from_numpy(x)).latent_dist.mean
    reconstruction = model.decode(mean).sample
  nhwc = lambda t: np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t).transpose(0, 2, 3, 1)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(OUT, 'autoencoder_kl_tiny.safetensors'))
  np.savez(os.path.join(OUT, 'autoencoder_kl_tiny.npz'), x=nhwc(x), z=nhwc(z), moments=nhwc(moments),
           decoded=nhwc(decoded), reconstruction=nhwc(reconstruction))
  print('parameters:', sum(p.numel() for p in model.parameters()))


if __name__ == '__main__':
  main()
