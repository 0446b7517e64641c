"""Makes tests/data/clip_tiny.{safetensors,npz} and clip_tiny_tokenizer.json: a seeded CLIP and its outputs.

Run once, in a throwaway environment (torch and transformers are never diffax dependencies)::

  python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers safetensors regex
  /tmp/refenv/bin/python tests/reference/make_clip_reference.py

* Tokenizer: a byte-level BPE in CLIP's format (the 256 byte symbols, the same with ``</w>``, merges, then
  ``<|startoftext|>`` and ``<|endoftext|>``) whose merges (at most 200; 74 for these captions) are learned from a few captions; transformers'
  ``CLIPTokenizer`` writes it as ``tokenizer.json`` (the file format of openai/clip-vit-large-patch14). Its ids
  must equal those of OpenAI's own algorithm (``SimpleTokenizer`` of openai/CLIP, copied below without ftfy) on
  every prompt, and both are stored.
* Model: transformers' ``CLIPModel`` (text: 3 layers, width 32, 4 heads, causal; vision: 2 layers, width 32,
  patch 8 at 32x32; projection 16; quick_gelu) with every tensor drawn from a seeded normal. Stored float32
  outputs: the text tower's final / penultimate / penultimate-then-final-norm hidden states, pooled output and
  projected embedding; the vision tower's pooled output and projected embedding; ``logits_per_image``.
"""

import collections
import os

import numpy as np
import regex as re
from safetensors.torch import save_file
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

OUT = os.path.join(os.path.dirname(__file__), '..', 'data')
CORPUS = ['a photo of a cat', 'a thin seven', 'a large zero on the left', 'a small handwritten digit',
          'two dogs playing in the snow', 'an oil painting of a lighthouse at sunset']
PROMPTS = ['a photo of a cat', 'A LARGE zero, on the left!', 'an unseen word: zebra 42', '']
MERGES = 200
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
  """openai/CLIP simple_tokenizer.py: reversible byte -> printable unicode symbol map."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
  bs += list(range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(2 ** 8):
    if b not in bs:
      bs.append(b)
      cs.append(2 ** 8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(corpus, num_merges):
  byte_encoder = bytes_to_unicode()
  words = collections.Counter()
  for text in corpus:
    for token in re.findall(PATTERN, text.lower()):
      symbols = [byte_encoder[b] for b in token.encode('utf-8')]
      words[tuple(symbols[:-1] + [symbols[-1] + '</w>'])] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


class SimpleTokenizer:
  """openai/CLIP's tokenizer (simple_tokenizer.py), reading our vocabulary; ``basic_clean`` without ftfy."""

  def __init__(self, vocab, merges):
    self.byte_encoder = bytes_to_unicode()
    self.encoder = vocab
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.pat = re.compile(PATTERN, re.IGNORECASE)

  def bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + '</w>',)
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float('inf')))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      new_word, i = [], 0
      while i < len(word):
        try:
          j = word.index(first, i)
        except ValueError:
          new_word.extend(word[i:])
          break
        new_word.extend(word[i:j])
        i = j
        if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
          new_word.append(first + second)
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      word = tuple(new_word)
    return word

  def encode(self, text):
    text = re.sub(r'\s+', ' ', text).strip().lower()
    ids = []
    for token in re.findall(self.pat, text):
      token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
      ids.extend(self.encoder[t] for t in self.bpe(token))
    return ids


def make_tokenizer():
  merges = learn_merges(CORPUS, MERGES)
  symbols = list(bytes_to_unicode().values())
  vocab_list = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges]
  vocab_list += ['<|startoftext|>', '<|endoftext|>']
  vocab = {s: i for i, s in enumerate(vocab_list)}
  hf = CLIPTokenizer(vocab=vocab, merges=list(merges))
  hf.backend_tokenizer.save(os.path.join(OUT, 'clip_tiny_tokenizer.json'))
  reference = SimpleTokenizer(vocab, merges)
  bos, eos = vocab['<|startoftext|>'], vocab['<|endoftext|>']
  ids = np.full((len(PROMPTS), 77), eos, np.int32)  # padded with <|endoftext|> as SD 1.x's tokenizer does
  for i, prompt in enumerate(PROMPTS):
    tokens = [bos] + reference.encode(prompt) + [eos]
    assert hf(prompt)['input_ids'] == tokens, (prompt, hf(prompt)['input_ids'], tokens)
    ids[i, :len(tokens)] = tokens
  return vocab, ids


def main():
  vocab, ids = make_tokenizer()
  config = CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=77, hidden_act='quick_gelu',
                       bos_token_id=vocab['<|startoftext|>'], eos_token_id=vocab['<|endoftext|>'], pad_token_id=1),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, hidden_act='quick_gelu'),
      projection_dim=16)
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == 'logit_scale':
        continue
      if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p) if name.endswith('bias') else torch.randn_like(p))
      elif 'embedding' in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # already CLIP-normalised
  with torch.no_grad():
    text = model.text_model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    vision = model.vision_model(pixel_values=torch.from_numpy(pixels))
    out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels))
    penultimate = text.hidden_states[-2]
    arrays = dict(
        input_ids=ids, pixels=pixels.transpose(0, 2, 3, 1),
        last_hidden_state=text.last_hidden_state, penultimate=penultimate,
        penultimate_norm=model.text_model.final_layer_norm(penultimate), text_pooled=text.pooler_output,
        text_embeds=model.text_projection(text.pooler_output), vision_pooled=vision.pooler_output,
        image_embeds=model.visual_projection(vision.pooler_output), logits_per_image=out.logits_per_image)
  state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state_dict, os.path.join(OUT, 'clip_tiny.safetensors'))
  np.savez(os.path.join(OUT, 'clip_tiny.npz'), **{k: np.asarray(v) for k, v in arrays.items()})
  print('parameters:', sum(p.numel() for p in model.parameters()), 'vocab:', len(vocab))
  print('buffers/keys not parameters:', sorted(set(state_dict) - {n for n, _ in model.named_parameters()}))


if __name__ == '__main__':
  main()
