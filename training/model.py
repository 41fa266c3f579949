"""Hierarchical, demographics-prompted BART over ICD-9-CM visit sequences.

* **Prompts** (as PromptEHR): each demographic feature (age: numeric, ``age / AGE_SCALE``; sex:
  categorical; more by :attr:`ModelConfig.extra_features`) becomes ``n_prompts_per_feature``
  learned vectors (feature embedding -> reparametrisation MLP), prepended to the encoder input
  and, by a second prompt module, to the decoder input.
* **Input embeddings**: a code token's embedding is ``E_code[c] + E_category[cat(c)] +
  E_chapter[chap(c)]``; structure tokens use ``E_token`` only. Learned positions count patient
  tokens (prompts carry no position).
* **Output** (``hierarchical=True``): a top-level softmax over the structure tokens and the 19
  chapters, then category given chapter, then code given category, each a softmax restricted to
  the members of its parent (segment log-sum-exp). Output weights are tied to the input
  embedding tables of each level. ``log P(code) = log P(chap) + log P(cat | chap) + log P(code |
  cat)``. With ``hierarchical=False`` one flat softmax over all tokens (tied to ``E_token``).
* **Layers**: ``transformers``' ``BartEncoderLayer`` / ``BartDecoderLayer``. The decoder is
  driven by a thin loop of our own with a plain-tensor key/value cache, a tuple of per-layer
  ``(self_k, self_v, cross_k, cross_v)`` each ``[B, heads, len, head_dim]``, so the step is
  traceable by ``torch.onnx.export`` (only shape-dependent control flow).

``<pad>``, ``<s>`` and ``<mask>`` are never predicted: their log-probability is
:data:`NEG_INF` (a finite -1e9, so numpy decoders and losses never meet ``nan``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartConfig
from transformers.models.bart.modeling_bart import BartDecoderLayer, BartEncoderLayer

from app.vocab import BOS, END_VISIT, EOS, MASK, PAD, SPECIAL_TOKENS, VISIT, Vocabulary
from training.config import AGE_SCALE, ModelConfig

__all__ = ["NEG_INF", "TARGET_BLOCK_BYTES", "HierBart", "PastKeyValues",
           "segment_logsumexp"]

NEG_INF = -1e9
# Without autograd (evaluation), :meth:`HierBart.target_log_probs` scores code targets in
# blocks of rows whose largest intermediate (the gathered weights of each target's category,
# or its category logits) stays within this size: in one piece a 32k-token evaluation batch of
# the claims-scale corpus gathered 280 MB at once.
TARGET_BLOCK_BYTES = 32 << 20
PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ...]
_PAD_ID, _BOS_ID, _MASK_ID = (SPECIAL_TOKENS.index(t) for t in (PAD, BOS, MASK))
_PREDICTABLE = tuple(SPECIAL_TOKENS.index(t) for t in (EOS, VISIT, END_VISIT))


def segment_logsumexp(x: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Log-sum-exp of ``x[..., i]`` grouped by ``segment[i]`` -> ``[..., n_segments]``.

    Exact per segment (each segment's own max is subtracted). Empty segments give a finite,
    very negative value. Uses only scatter/gather (ONNX ScatterElements, opset 18).
    """
    index = segment.expand_as(x)
    shape = (*x.shape[:-1], n_segments)
    init = torch.full(shape, NEG_INF, dtype=x.dtype, device=x.device)
    peak = init.scatter_reduce(-1, index, x.detach(), reduce="amax", include_self=True)
    shifted = torch.exp(x - peak.gather(-1, index))
    total = torch.zeros(shape, dtype=x.dtype, device=x.device).scatter_add(-1, index, shifted)
    return peak + torch.log(total.clamp_min(1e-30))


class DemographicPrompts(nn.Module):
    """PromptEHR-style conditional prompts: features -> ``[B, n_prompts, d_model]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, per = config.prompt_hidden, config.n_prompts_per_feature
        self.numeric = ["age"] + [f.name for f in config.extra_features if f.kind == "numeric"]
        self.scales = [AGE_SCALE] + [f.scale for f in config.extra_features if f.kind == "numeric"]
        cats = [("sex", 2)] + [(f.name, f.n_values) for f in config.extra_features
                               if f.kind == "categorical"]
        self.categorical = [name for name, _ in cats]
        # unit-scale init: with zero biases the prompt would be proportional to the value, and
        # the embedding LayerNorm would erase it; this puts tanh in its nonlinear range
        self.num_weight = nn.Parameter(torch.randn(len(self.numeric), hidden))
        self.num_bias = nn.Parameter(torch.randn(len(self.numeric), hidden))
        self.cat_embed = nn.ModuleList(nn.Embedding(n, hidden) for _, n in cats)
        self.per = per
        self.d_model = config.d_model
        self.reparam = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, per * config.d_model))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        numeric = torch.stack([features[n].to(self.num_weight.dtype) / s
                               for n, s in zip(self.numeric, self.scales, strict=True)], dim=-1)
        parts = [numeric.unsqueeze(-1) * self.num_weight + self.num_bias]  # [B, n_num, hidden]
        parts += [emb(features[n].long()).unsqueeze(1)
                  for n, emb in zip(self.categorical, self.cat_embed, strict=True)]
        hidden = torch.cat(parts, dim=1)  # [B, n_features, hidden]
        out = self.reparam(hidden)  # [B, n_features, per * d]
        return out.reshape(out.shape[0], -1, self.d_model)


class HierBart(nn.Module):
    """The encoder-decoder; see the module docstring for the architecture."""

    def __init__(self, config: ModelConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        if vocab is not None:
            config.n_tokens, config.n_special = len(vocab), vocab.n_special
            config.n_codes, config.n_categories = vocab.n_codes, vocab.n_categories
            config.n_chapters = vocab.n_chapters
        if config.n_codes <= 0 or config.n_tokens != config.n_special + config.n_codes:
            raise ValueError("ModelConfig needs the vocabulary sizes (pass vocab=)")
        self.config = config
        d = config.d_model
        bart = BartConfig(
            d_model=d, encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
            encoder_attention_heads=config.attention_heads,
            decoder_attention_heads=config.attention_heads, encoder_ffn_dim=config.ffn_dim,
            decoder_ffn_dim=config.ffn_dim, dropout=config.dropout,
            attention_dropout=config.attention_dropout, activation_dropout=0.0,
            activation_function=config.activation_function, vocab_size=config.n_tokens,
            max_position_embeddings=config.max_positions)
        bart._attn_implementation = "sdpa"
        self.bart_config = bart
        self.n_heads = config.attention_heads
        self.head_dim = d // config.attention_heads

        self.token_embed = nn.Embedding(config.n_tokens, d)
        self.position_embed = nn.Embedding(config.max_positions, d)
        self.encoder_prompts = DemographicPrompts(config)
        self.decoder_prompts = DemographicPrompts(config)
        self.encoder_embed_norm = nn.LayerNorm(d)
        self.decoder_embed_norm = nn.LayerNorm(d)
        self.encoder_layers = nn.ModuleList(BartEncoderLayer(bart, layer_idx=i)
                                            for i in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(BartDecoderLayer(bart, layer_idx=i)
                                            for i in range(config.decoder_layers))
        self.dropout = nn.Dropout(config.dropout)

        n_top = config.n_special + config.n_chapters
        top_mask = torch.full((n_top,), NEG_INF)
        if not config.hierarchical:
            top_mask = torch.full((config.n_tokens,), NEG_INF)
        top_mask[list(_PREDICTABLE)] = 0.0
        top_mask[config.n_special:] = 0.0  # chapters (hierarchical) or codes (flat)
        self.register_buffer("output_mask", top_mask)
        if config.hierarchical:
            self.category_embed = nn.Embedding(config.n_categories + 1, d,
                                               padding_idx=config.n_categories)
            self.chapter_embed = nn.Embedding(config.n_chapters + 1, d,
                                              padding_idx=config.n_chapters)
            self.top_bias = nn.Parameter(torch.zeros(n_top))
            self.category_bias = nn.Parameter(torch.zeros(config.n_categories))
            self.code_bias = nn.Parameter(torch.zeros(config.n_codes))
            # hierarchy index arrays (persistent buffers: saved with the weights)
            self.register_buffer("code_category", torch.zeros(config.n_codes, dtype=torch.long))
            self.register_buffer("category_chapter",
                                 torch.zeros(config.n_categories, dtype=torch.long))
            self.register_buffer("token_category",
                                 torch.full((config.n_tokens,), config.n_categories))
            self.register_buffer("token_chapter", torch.full((config.n_tokens,), config.n_chapters))
            if vocab is not None:
                self.set_hierarchy(torch.as_tensor(vocab.code_category),
                                   torch.as_tensor(vocab.category_chapter))
        else:
            self.output_bias = nn.Parameter(torch.zeros(config.n_tokens))
        if config.aux_heads:
            self.age_head = nn.Linear(d, 1)
            self.sex_head = nn.Linear(d, 2)
        self.apply(self._init_weights)

    # -- setup --------------------------------------------------------------------------------
    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def set_hierarchy(self, code_category: torch.Tensor, category_chapter: torch.Tensor) -> None:
        c = self.config
        self.code_category.copy_(code_category)
        self.category_chapter.copy_(category_chapter)
        self.token_category[c.n_special:] = code_category
        self.token_chapter[c.n_special:] = category_chapter[code_category]
        # chapters without any category in the vocabulary can never be predicted
        present = torch.zeros(c.n_chapters, dtype=torch.bool)
        present[category_chapter] = True
        self.output_mask[c.n_special:] = torch.where(present, 0.0, NEG_INF)

    # -- embeddings and prompts ---------------------------------------------------------------
    def _features(self, age: torch.Tensor, sex: torch.Tensor,
                  extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        return {"age": age, "sex": sex, **(extra or {})}

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(ids)
        if self.config.hierarchical:
            x = x + self.category_embed(self.token_category[ids]) \
                + self.chapter_embed(self.token_chapter[ids])
        return x

    # -- encoder ------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, age: torch.Tensor,
               sex: torch.Tensor, extra: dict[str, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encoder_hidden [B, P + S, d], encoder_mask [B, P + S])``; P prompt positions."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.position_embed(positions)
        prompts = self.encoder_prompts(self._features(age, sex, extra)).to(x.dtype)
        h = self.dropout(self.encoder_embed_norm(torch.cat([prompts, x], dim=1)))
        mask = torch.cat([torch.ones(prompts.shape[:2], dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        additive = self._additive(mask, h.dtype)
        for layer in self.encoder_layers:
            h = layer(h, attention_mask=additive)
        return h, mask

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, S]`` 1/0 mask -> additive ``[B, 1, 1, S]``."""
        return ((1.0 - mask.to(dtype)) * NEG_INF)[:, None, None, :]

    # -- decoder ------------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _attend(self, attn: nn.Module, query_states: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self._heads(attn.q_proj(query_states))
        p = attn.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=p)
        b, _, t, _ = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def decoder_hidden(self, decoder_input_ids: torch.Tensor, age: torch.Tensor,
                       sex: torch.Tensor, encoder_hidden: torch.Tensor,
                       encoder_mask: torch.Tensor, past_key_values: PastKeyValues | None = None,
                       extra: dict[str, torch.Tensor] | None = None,
                       ) -> tuple[torch.Tensor, PastKeyValues]:
        """Decoder states of the ``T`` new tokens ``[B, T, d]`` and the grown cache."""
        n_prompts = self.config.n_prompts
        seq = decoder_input_ids.shape[1]
        if past_key_values is None:
            past_len, start = 0, 0
        else:
            past_len = past_key_values[0][0].shape[2]
            start = past_len - n_prompts
        positions = torch.arange(seq, device=decoder_input_ids.device) + start
        x = self.embed_tokens(decoder_input_ids) + self.position_embed(positions)
        if past_key_values is None:
            prompts = self.decoder_prompts(self._features(age, sex, extra)).to(x.dtype)
            x = torch.cat([prompts, x], dim=1)
        h = self.dropout(self.decoder_embed_norm(x))
        length = h.shape[1]
        queries = torch.arange(length, device=h.device)[:, None] + past_len
        keys = torch.arange(past_len + length, device=h.device)[None, :]
        causal = torch.where(keys <= queries, 0.0, NEG_INF).to(h.dtype)[None, None]
        cross_mask = self._additive(encoder_mask, h.dtype)
        new_past = []
        for i, layer in enumerate(self.decoder_layers):
            sa = layer.self_attn
            k, v = self._heads(sa.k_proj(h)), self._heads(sa.v_proj(h))
            if past_key_values is not None:
                k = torch.cat([past_key_values[i][0], k], dim=2)
                v = torch.cat([past_key_values[i][1], v], dim=2)
            out = self._attend(sa, h, k, v, causal)
            h = layer.self_attn_layer_norm(h + self.dropout(out))
            ca = layer.encoder_attn
            if past_key_values is None:
                ck, cv = self._heads(ca.k_proj(encoder_hidden)), self._heads(ca.v_proj(encoder_hidden))
            else:
                ck, cv = past_key_values[i][2], past_key_values[i][3]
            out = self._attend(ca, h, ck, cv, cross_mask)
            h = layer.encoder_attn_layer_norm(h + self.dropout(out))
            out = layer.fc2(layer.activation_fn(layer.fc1(h)))
            h = layer.final_layer_norm(h + self.dropout(out))
            new_past.append((k, v, ck, cv))
        if past_key_values is None:
            h = h[:, n_prompts:]
        return h, tuple(new_past)

    def output_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Flat token log-probabilities ``[..., n_tokens]`` from decoder states ``[..., d]``."""
        c = self.config
        if not c.hierarchical:
            logits = h @ self.token_embed.weight.T + self.output_bias + self.output_mask
            return torch.log_softmax(logits, dim=-1)
        top_weight = torch.cat([self.token_embed.weight[:c.n_special],
                                self.chapter_embed.weight[:c.n_chapters]], dim=0)
        top = torch.log_softmax(h @ top_weight.T + self.top_bias + self.output_mask, dim=-1)
        cat_logits = h @ self.category_embed.weight[:c.n_categories].T + self.category_bias
        cat_lse = segment_logsumexp(cat_logits, self.category_chapter, c.n_chapters)
        cat_lp = cat_logits - cat_lse.gather(-1, self.category_chapter.expand_as(cat_logits))
        code_logits = h @ self.token_embed.weight[c.n_special:].T + self.code_bias
        code_lse = segment_logsumexp(code_logits, self.code_category, c.n_categories)
        code_lp = code_logits - code_lse.gather(-1, self.code_category.expand_as(code_logits))
        code_chapter = self.category_chapter[self.code_category]
        chapter_lp = top[..., c.n_special:]
        full = (chapter_lp.gather(-1, code_chapter.expand_as(code_lp))
                + cat_lp.gather(-1, self.code_category.expand_as(code_lp)) + code_lp)
        return torch.cat([top[..., :c.n_special], full], dim=-1)

    def target_log_probs(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``log P(target)`` for states ``[N, d]`` and token ids ``[N]``: equal to
        ``output_log_probs(h).gather(1, target[:, None])`` without the full distribution.

        The hierarchical head only needs the target's chapter, the categories of that chapter
        and the codes of the target's category, so the loss costs ``O(d x (categories +
        largest category))`` per position instead of ``O(d x codes)``: most of a step on a
        MIMIC-sized vocabulary.
        """
        c = self.config
        if not c.hierarchical:
            return self.output_log_probs(h).gather(1, target[:, None]).squeeze(1)
        top_weight = torch.cat([self.token_embed.weight[:c.n_special],
                                self.chapter_embed.weight[:c.n_chapters]], dim=0)
        top = torch.log_softmax(h @ top_weight.T + self.top_bias + self.output_mask, dim=-1)
        is_code = target >= c.n_special
        code = (target - c.n_special).clamp_min(0)
        category = self.code_category[code]
        chapter = self.category_chapter[category]
        top_index = torch.where(is_code, c.n_special + chapter, target)
        out = top.gather(1, top_index[:, None]).squeeze(1)
        rows = torch.nonzero(is_code).squeeze(1)
        if rows.numel() == 0:
            return out
        hc, cat, chap, cd = h[rows], category[rows], chapter[rows], code[rows]
        block = hc.shape[0]
        if not torch.is_grad_enabled():
            # without autograd nothing is kept for a backward pass: rows in blocks, so the
            # [rows, largest category, d] gathered weights stay within TARGET_BLOCK_BYTES
            width = max(c.n_categories, self._category_members()[0].shape[1] * hc.shape[1])
            block = max(1, TARGET_BLOCK_BYTES // (width * hc.element_size()))
        if block >= hc.shape[0]:
            return out.index_add(0, rows, self._code_terms(hc, cat, chap, cd))
        terms = torch.cat([self._code_terms(hc[s:s + block], cat[s:s + block],
                                            chap[s:s + block], cd[s:s + block])
                           for s in range(0, hc.shape[0], block)])
        return out.index_add(0, rows, terms)

    def _code_terms(self, hc: torch.Tensor, cat: torch.Tensor, chap: torch.Tensor,
                    cd: torch.Tensor) -> torch.Tensor:
        """``log P(category | chapter) + log P(code | category)`` of code targets: states
        ``[R, d]``, their categories, chapters and codes ``[R]``."""
        c = self.config
        cat_logits = hc @ self.category_embed.weight[:c.n_categories].T + self.category_bias
        same_chapter = self.category_chapter[None, :] == chap[:, None]
        cat_lse = torch.logsumexp(cat_logits.masked_fill(~same_chapter, NEG_INF), dim=-1)
        cat_lp = cat_logits.gather(1, cat[:, None]).squeeze(1) - cat_lse
        members, member_ok = self._category_members()
        idx = members[cat]  # [R, M] code indices of each target's category (padded)
        weight = self.token_embed.weight[c.n_special:]
        code_logits = torch.einsum("rd,rmd->rm", hc, weight[idx]) + self.code_bias[idx]
        code_lse = torch.logsumexp(code_logits.masked_fill(~member_ok[cat], NEG_INF), dim=-1)
        own = (hc * weight[cd]).sum(-1) + self.code_bias[cd]
        return cat_lp + own - code_lse

    def _category_members(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``[categories, largest]`` code indices per category and their validity."""
        key = (self.code_category.data_ptr(), str(self.code_category.device))
        cached = getattr(self, "_members_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        c = self.config
        cat = self.code_category
        counts = torch.bincount(cat, minlength=c.n_categories)
        width = int(counts.max()) if counts.numel() else 1
        order = torch.argsort(cat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(c.n_codes, device=cat.device) - starts[cat[order]]
        members = torch.zeros(c.n_categories, width, dtype=torch.long, device=cat.device)
        ok = torch.zeros(c.n_categories, width, dtype=torch.bool, device=cat.device)
        members[cat[order], slot] = order
        ok[cat[order], slot] = True
        self._members_cache = (key, members, ok)
        return members, ok

    def level_logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The hierarchical head before its segment normalisation (for export).

        ``(top_log_probs [..., n_special + n_chapters], category_logits [..., n_categories],
        code_logits [..., n_codes])``: the same terms :meth:`output_log_probs` combines;
        :class:`app.decoding.hier_head.HierarchicalHead` finishes them in numpy.
        """
        c = self.config
        if not c.hierarchical:
            raise ValueError("level_logits needs a hierarchical model")
        top_weight = torch.cat([self.token_embed.weight[:c.n_special],
                                self.chapter_embed.weight[:c.n_chapters]], dim=0)
        top = torch.log_softmax(h @ top_weight.T + self.top_bias + self.output_mask, dim=-1)
        cat_logits = h @ self.category_embed.weight[:c.n_categories].T + self.category_bias
        code_logits = h @ self.token_embed.weight[c.n_special:].T + self.code_bias
        return top, cat_logits, code_logits

    def decode(self, decoder_input_ids: torch.Tensor, age: torch.Tensor, sex: torch.Tensor,
               encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor,
               past_key_values: PastKeyValues | None = None,
               extra: dict[str, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, PastKeyValues]:
        """``(log_probs [B, T, n_tokens], new_past)``; prompts are prepended when past is None."""
        h, past = self.decoder_hidden(decoder_input_ids, age, sex, encoder_hidden, encoder_mask,
                                      past_key_values, extra)
        return self.output_log_probs(h), past

    # -- training forward ---------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor, age: torch.Tensor, sex: torch.Tensor,
                extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder states ``[B, T, d]`` for teacher forcing (heads applied by the objective)."""
        enc, enc_mask = self.encode(input_ids, attention_mask, age, sex, extra)
        h, _ = self.decoder_hidden(decoder_input_ids, age, sex, enc, enc_mask, None, extra)
        return h

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` (the :class:`ModelConfig`) and ``model.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_bundle(cls, path: str | Path, map_location: str = "cpu") -> HierBart:
        """Load a model written by :meth:`save` (a bundle folder or any folder with the two files)."""
        from safetensors.torch import load_file

        path = Path(path)
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = cls(config)
        state = load_file(str(path / "model.safetensors"), device=map_location)
        model.load_state_dict(state, strict=True)
        model.eval()
        return model

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
