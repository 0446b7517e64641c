"""CLIP's text transformer (Radford et al. 2021, sec. 2.4) and its BPE tokenizer: Stable Diffusion's text encoder.

A GPT-2-style stack of pre-LayerNorm blocks over ``context_length`` (77) tokens with a causal mask: token +
learned position embeddings -> ``num_layers`` x [x + attn(LN(x)), x + MLP(LN(x))] -> final LayerNorm. The
sequence representation (``pooled``) is the final state at the first ``<|endoftext|>`` token. Module names follow
Hugging Face's ``CLIPTextModel`` so that its checkpoints convert name by name (:mod:`diffax.models.convert.clip`).

Which hidden state conditions a diffusion model (``hidden_state``):

* ``'final'``: LN(h_L), Stable Diffusion 1.x (Rombach et al. 2022, sec. 4.3);
* ``'penultimate'``: h_{L-1} without the final norm, SDXL (Podell et al. 2023, sec. 2.1);
* ``'penultimate_norm'``: LN(h_{L-1}), "CLIP skip 2" of diffusers' pipelines and SD 2.x's OpenCLIP layer.

The tokenizer is Hugging Face ``tokenizers`` reading a local ``tokenizer.json`` (the file published with
openai/clip-vit-large-patch14): lower-cased, byte-level BPE with ``</w>`` word ends, ``<|startoftext|>`` ...
``<|endoftext|>``, padded to the context with ``pad_token``.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import Any

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from diffax.models import layers
from diffax.models.convert import safetensors_io

Array = jax.Array
Dtype = layers.Dtype

ACTIVATIONS = {'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x), 'gelu': lambda x: nn.gelu(x, approximate=False)}
"""The MLP nonlinearity: OpenAI's CLIP uses ``x sigmoid(1.702 x)``; OpenCLIP (SD 2.x) the exact GELU."""


def layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm (eps 1e-5) computed in float32 with the two-pass variance, as PyTorch's."""
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
                      scale_init=layers.partitioned(nn.initializers.ones, ('norm',)),
                      bias_init=layers.partitioned(layers.zeros, ('norm',)), name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate ``q/k/v/out`` projections (HF ``CLIPAttention``)."""
  num_heads: int
  causal: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, L, D] -> [B, L, D]; position i attends to j <= i if ``causal``."""
    b, length, width = x.shape
    heads = lambda name: layers.dense(width, ('embed', 'mlp'), dtype=self.dtype, name=name)(x).reshape(
        b, length, self.num_heads, width // self.num_heads)  # [B, L, H, D/H]
    with jax.numpy_dtype_promotion('standard'):
      y = jax.nn.dot_product_attention(heads('q_proj'), heads('k_proj'), heads('v_proj'), is_causal=self.causal)
    return layers.dense(width, ('mlp', 'embed'), dtype=self.dtype, name='out_proj')(y.reshape(b, length, width))


class EncoderLayer(nn.Module):
  """``x + attn(LN1(x))``, then ``x + fc2(act(fc1(LN2(x))))`` (HF ``CLIPEncoderLayer``)."""
  num_heads: int
  mlp_dim: int
  activation: str = 'quick_gelu'
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, L, D] -> [B, L, D] float32 residual stream."""
    h = layer_norm('layer_norm1')(x).astype(self.dtype)
    x = x + SelfAttention(self.num_heads, self.causal, self.dtype, name='self_attn')(h).astype(jnp.float32)
    h = layer_norm('layer_norm2')(x).astype(self.dtype)
    h = MLP(self.mlp_dim, self.activation, self.dtype, name='mlp')(h)
    return x + h.astype(jnp.float32)


class MLP(nn.Module):
  mlp_dim: int
  activation: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.dense(self.mlp_dim, ('embed', 'mlp'), dtype=self.dtype, name='fc1')(x)
    return layers.dense(x.shape[-1], ('mlp', 'embed'), dtype=self.dtype, name='fc2')(ACTIVATIONS[self.activation](h))


class Encoder(nn.Module):
  """``num_layers`` :class:`EncoderLayer`; returns the last two hidden states (h_{L-1}, h_L), each [B, L, D]."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  activation: str = 'quick_gelu'
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    previous = x
    for i in range(self.num_layers):
      previous, x = x, EncoderLayer(self.num_heads, self.mlp_dim, self.activation, self.causal, self.dtype,
                                    name=f'layers_{i}')(x)
    return previous, x


class TextEmbeddings(nn.Module):
  vocab_size: int
  width: int
  context_length: int

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    """Token ids [B, L] -> token + position embeddings [B, L, D] float32."""
    embed = lambda n, name: nn.Embed(n, self.width, param_dtype=jnp.float32, name=name, embedding_init=
                                     layers.partitioned(nn.initializers.normal(0.02), ('classes', 'embed')))
    tokens = embed(self.vocab_size, 'token_embedding')(input_ids)
    return tokens + embed(self.context_length, 'position_embedding')(jnp.arange(input_ids.shape[1]))[None]


@struct.dataclass
class TextEncoding:
  """``context`` [B, L, D]: the chosen hidden state (cross-attention context); ``pooled`` [B, D]: LN(h_L) at the
  first end token (CLIP's sequence representation, before the projection)."""
  context: Array
  pooled: Array


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower: ``apply({'params': p}, input_ids [B, L<=context_length] int) -> TextEncoding``."""
  vocab_size: int = 49408
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  context_length: int = 77
  activation: str = 'quick_gelu'
  eos_token_id: int = 49407
  hidden_state: str = 'final'
  dtype: Dtype = jnp.float32

  def example_inputs(self) -> tuple[Array]:
    return (jnp.zeros((1, self.context_length), jnp.int32),)

  @nn.compact
  def __call__(self, input_ids: Array) -> TextEncoding:
    if input_ids.ndim != 2 or input_ids.shape[1] > self.context_length:
      raise ValueError(f'The text encoder takes token ids [B, L] with L <= {self.context_length}; got '
                       f'{input_ids.shape} (tokenize prompts with CLIPTokenizer).')
    if self.hidden_state not in ('final', 'penultimate', 'penultimate_norm'):
      raise ValueError(f"Unknown hidden_state {self.hidden_state!r}; choose 'final', 'penultimate' or "
                       "'penultimate_norm'.")
    x = TextEmbeddings(self.vocab_size, self.width, self.context_length, name='embeddings')(input_ids)
    penultimate, last = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.activation, causal=True,
                                dtype=self.dtype, name='encoder')(x)
    final_norm = layer_norm('final_layer_norm')
    last = final_norm(last)
    eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # [B] first end token
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    context = {'final': last, 'penultimate': penultimate, 'penultimate_norm': None}[self.hidden_state]
    return TextEncoding(final_norm(penultimate) if context is None else context, pooled)


TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14's text tower, SD 1.x's encoder: 123,060,480 parameters.
    'vit_l14': dict(vocab_size=49408, width=768, num_layers=12, num_heads=12, mlp_dim=3072),
    # OpenCLIP ViT-H/14's text tower as SD 2.x ships it (23 of 24 layers, i.e. its penultimate layer, then LN).
    'vit_h14_sd2': dict(vocab_size=49408, width=1024, num_layers=23, num_heads=16, mlp_dim=4096, activation='gelu'),
}
"""Text-encoder fields by preset: ``CLIPTextTransformer(**TEXT_PRESETS['vit_l14'])``."""

TOKENIZER_ENV_VAR = 'DIFFAX_CLIP_TOKENIZER'
TOKENIZER_HOW_TO_GET = f"""Nothing is downloaded at run time. Download CLIP's tokenizer once:
  curl -L -o clip-vit-large-patch14-tokenizer.json \\
    https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/tokenizer.json
then pass the path or export {TOKENIZER_ENV_VAR}=$PWD/clip-vit-large-patch14-tokenizer.json."""


class CLIPTokenizer:
  """Prompts -> token ids [B, context_length] int32: ``<|startoftext|>`` BPE tokens ``<|endoftext|>``, padded.

  Args:
    path: a Hugging Face ``tokenizer.json`` (defaults to ``$DIFFAX_CLIP_TOKENIZER``).
    context_length: the text encoder's context (77 for CLIP).
    pad_token: ``'<|endoftext|>'`` (SD 1.x / openai) or ``'!'`` (SD 2.x / OpenCLIP pads with id 0).
    truncate: cut prompts longer than the context (keeping the end token), as SD's pipelines do; by default a
      long prompt is an error, since the cut words would silently not condition the image.
  """

  def __init__(self, path: str | os.PathLike | None = None, *, context_length: int = 77,
               pad_token: str = '<|endoftext|>', truncate: bool = False):
    where = safetensors_io.resolve_path(path, env_var=TOKENIZER_ENV_VAR, what='CLIP tokenizer',
                                        how_to_get=TOKENIZER_HOW_TO_GET)
    self.tokenizer = tokenizers.Tokenizer.from_file(os.fspath(where))
    self.context_length = context_length
    self.truncate = truncate
    self.eos_token_id = self._token_id('<|endoftext|>')
    self.pad_token_id = self._token_id(pad_token)

  def _token_id(self, token: str) -> int:
    token_id = self.tokenizer.token_to_id(token)
    if token_id is None:
      raise ValueError(f'{token!r} is not in the tokenizer\'s vocabulary: is this a CLIP tokenizer.json?')
    return token_id

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    ids = np.full((len(prompts), self.context_length), self.pad_token_id, np.int32)
    for i, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
      tokens = encoding.ids
      if len(tokens) > self.context_length:
        if not self.truncate:
          raise ValueError(f'Prompt {i} ({prompts[i][:60]!r}...) is {len(tokens)} tokens with its start and end '
                           f'tokens, longer than the text encoder\'s context of {self.context_length}: shorten it '
                           'or pass truncate=True.')
        tokens = tokens[:self.context_length - 1] + [self.eos_token_id]
      ids[i, :len(tokens)] = tokens
    return ids
