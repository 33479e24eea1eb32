"""The one mechanism that puts soft-prompt vectors into a frozen causal LM.

A soft prompt is a dict ``{layer: (P, d) tensor}``: the hidden states of ``P`` reserved positions at the
front of the sequence as they *enter* each listed decoder layer. Layer 0 only is prompt tuning / P-Tuning
(the vectors are input embeddings); many layers is deep prompting (P-Tuning v2).

Because the prompt positions come first and attention is causal, they attend only to themselves: their
per-layer keys/values do not depend on the input. So we run the model's own forward over the ``P`` prompt
positions once per task (forward pre-hooks overwrite the hidden states of listed layers), keep the resulting
key/value cache, and run the real tokens with it as a prefix cache. The model builds that cache itself, so its
layout (grouped-query attention, RoPE already applied at positions ``0..P-1``) is always right, and gradients
flow back to the prompt vectors when they require grad.

Rows of one batch may use different soft prompts of different lengths (or none): each row's prefix is
left-padded to the longest one and masked, and the row's tokens get position ids starting at its own ``P``.
Where rows differ in length, :func:`forward_packed` runs them unpadded instead, one after another in a single
sequence behind every distinct prompt once, with a block mask: no compute on padding.

Callers that read few final hidden states (training targets, each row's last position when ranking labels or
starting generation, none at all for a prompt's own keys/values) pass ``read=``: the last decoder layer then runs
its query / output projections and feed-forward block at those positions only (:func:`reading`; keys and values
still everywhere, so caches stay exact). It works by giving those sub-modules of the last layer an instance-level
``forward`` that selects rows while a forward asks for it and is the class's own otherwise; weights, state dict,
copies and pickles are unaffected, and a model that fails a one-off check runs in full.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import threading
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers import DynamicCache

# A soft prompt: hidden states of P positions entering the given decoder layers.
SoftPrompt = Mapping[int, torch.Tensor]
# Per-layer (key, value), each (1, n_kv_heads, P, head_dim).
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameters: where the tensors it is fed must be built. CPU without any."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def find_layers(model: nn.Module, paths: Sequence[str]) -> nn.ModuleList | None:
    """The first ``nn.ModuleList`` found under ``model.base_model`` at one of the dotted ``paths``."""
    base = getattr(model, "base_model", model)
    for path in paths:
        obj = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face causal LM (Llama, Mistral, Qwen, GPT-2, ...)."""
    layers = find_layers(model, ("layers", "h", "decoder.layers", "blocks"))
    if layers is None:
        raise TypeError(
            f"cannot find the decoder layers of {type(model).__name__}; supported: Llama-style .layers, GPT-2 .h"
        )
    return layers


@lru_cache(maxsize=32)
def _cache_kwarg(forward_cls: type) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns); accept both.
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output) -> DynamicCache | None:
    """The key/value cache of a model output (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_kwargs(model: nn.Module, cache: DynamicCache | None) -> dict:
    """Keyword arguments passing ``cache`` to ``model.forward`` under the name this transformers uses."""
    return {_cache_kwarg(type(model)): cache}


class _OverwriteHidden:
    """Forward pre-hook: replace the layer's input hidden states with a fixed (1, P, d) tensor.

    Acts only in the thread that registered it, so forwards that other threads run on the same shared model
    while it is registered are not affected.
    """

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.thread = threading.get_ident()

    def __call__(self, module, args, kwargs=None):
        # kwargs=None: torch registers a with_kwargs hook in two steps (and removes it in two), so a forward in
        # another thread can call it in between without kwargs; such calls are not ours and change nothing.
        if threading.get_ident() != self.thread:
            return None
        if args:
            hidden = args[0]
            return (self.value.to(hidden.device, hidden.dtype).expand_as(hidden), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        kwargs = dict(kwargs, hidden_states=self.value.to(hidden.device, hidden.dtype).expand_as(hidden))
        return args, kwargs


def prompt_kv(model: nn.Module, soft_prompt: SoftPrompt) -> PrefixKV:
    """Run the frozen model over the ``P`` prompt positions alone and return their per-layer keys/values.

    Differentiable with respect to the prompt tensors. Layer 0 must be present (it is the input embedding).
    Returns one ``(key, value)`` pair per decoder layer, each ``(1, n_kv_heads, P, head_dim)``.
    """
    if 0 not in soft_prompt:
        raise ValueError(f"a soft prompt needs layer 0 (input embeddings); got layers {sorted(soft_prompt)}")
    layers = decoder_layers(model)
    x0 = soft_prompt[0]
    if x0.dim() != 2:
        raise ValueError(f"soft prompt tensors must be (P, d); layer 0 has shape {tuple(x0.shape)}")
    handles = []
    try:
        for layer_idx, value in soft_prompt.items():
            if layer_idx == 0:
                continue
            if not 0 < layer_idx < len(layers):
                raise ValueError(f"soft prompt layer {layer_idx} out of range for a {len(layers)}-layer model")
            handles.append(layers[layer_idx].register_forward_pre_hook(_OverwriteHidden(value[None]), with_kwargs=True))
        base = model.base_model
        cache = DynamicCache(config=model.config)
        param = next(model.parameters())
        embeds = x0[None].to(param.device, param.dtype)  # a stored prompt may be on another device than the model
        with _reading_if(model, (), embeds.shape[1]):  # only the keys/values are kept: no output is read
            base(inputs_embeds=embeds, use_cache=True, **cache_kwargs(base, cache))  # (1, P, d)
    finally:
        for h in handles:
            h.remove()
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class PrefixBatch:
    """Everything a forward over left-padded tokens needs to run behind per-row soft prompts."""

    cache: DynamicCache | None  # None when no row has a prompt
    attention_mask: torch.Tensor  # (B, P_max + T) long
    position_ids: torch.Tensor  # (B, T)
    prefix_len: int  # P_max


def build_prefix_batch(
    model: nn.Module,
    row_kv: Sequence[PrefixKV | None],
    token_mask: torch.Tensor,
) -> PrefixBatch:
    """Assemble the prefix cache, attention mask and position ids for a batch with per-row soft prompts.

    ``row_kv[b]`` is the :func:`prompt_kv` output of row ``b``'s prompt (the same object for rows that share a
    task, so each prompt is expanded once) or ``None`` for no prompt. ``token_mask`` is the (B, T) attention
    mask of the left-padded tokens.
    """
    attention_mask, positions, p_max = _padded_layout(row_kv, token_mask)
    if p_max == 0:
        return PrefixBatch(None, attention_mask, positions, 0)

    # Group rows by prompt object: each distinct prompt is padded once, then gathered per row.
    distinct: list[PrefixKV | None] = []
    slot_of: dict[int, int] = {}
    row_slot = []
    for kv in row_kv:
        key = id(kv)
        if key not in slot_of:
            slot_of[key] = len(distinct)
            distinct.append(kv)
        row_slot.append(slot_of[key])
    index = torch.tensor(row_slot, device=token_mask.device)

    layers = []
    template = next(kv for kv in distinct if kv is not None)
    for layer_idx, (k_ref, v_ref) in enumerate(template):
        ks, vs = [], []
        for kv in distinct:
            if kv is None:
                k = k_ref.new_zeros(1, k_ref.shape[1], p_max, k_ref.shape[3])
                v = v_ref.new_zeros(1, v_ref.shape[1], p_max, v_ref.shape[3])
            else:
                k, v = kv[layer_idx]
                pad = p_max - k.shape[2]
                if pad:  # left-pad the prefix: (1, kvh, P, hd) -> (1, kvh, P_max, hd)
                    k = torch.cat([k.new_zeros(1, k.shape[1], pad, k.shape[3]), k], dim=2)
                    v = torch.cat([v.new_zeros(1, v.shape[1], pad, v.shape[3]), v], dim=2)
            ks.append(k)
            vs.append(v)
        keys = torch.cat(ks, 0).index_select(0, index)  # (B, kvh, P_max, hd)
        values = torch.cat(vs, 0).index_select(0, index)
        layers.append((keys, values))
    cache = DynamicCache(layers, config=model.config)
    return PrefixBatch(cache, attention_mask, positions, p_max)


def _padded_layout(
    row_kv: Sequence[PrefixKV | None], token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Attention mask (B, P_max + T), token position ids (B, T) and P_max of left-padded tokens behind per-row
    prompts, each row's prompt left-padded to the longest one."""
    bsz = token_mask.shape[0]
    if len(row_kv) != bsz:
        raise ValueError(f"got {len(row_kv)} prompt entries for a batch of {bsz} rows")
    token_mask = token_mask.long()
    lens = [0 if kv is None else kv[0][0].shape[2] for kv in row_kv]
    p_max = max(lens)
    positions = torch.tensor(lens, device=token_mask.device)[:, None] + token_mask.cumsum(-1) - 1
    positions = positions.clamp_min(0)  # (B, T); padding positions get a harmless value
    prefix_mask = torch.zeros(bsz, p_max, dtype=torch.long, device=token_mask.device)
    for b, n in enumerate(lens):
        if n:
            prefix_mask[b, p_max - n :] = 1
    return torch.cat([prefix_mask, token_mask], dim=1), positions, p_max


def forward_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    row_kv: Sequence[PrefixKV | None],
    *,
    use_cache: bool = False,
    read: Sequence[int] | None = None,
) -> tuple[torch.Tensor, DynamicCache | None, PrefixBatch]:
    """Final hidden states (B, T, d) of left-padded tokens behind per-row soft prompts.

    The LM head is not applied: callers project only the positions they need. ``read``: the flat positions
    (``b * T + t``) the caller will read; the others' final hidden states are then undefined, and the last layer
    skips most of its work there (:func:`reading`). The cache is exact either way.
    """
    prefix = build_prefix_batch(model, row_kv, token_mask)
    base = model.base_model
    with _reading_if(model, read, input_ids.numel()):
        out = base(
            input_ids=input_ids,
            attention_mask=prefix.attention_mask,
            position_ids=prefix.position_ids,
            use_cache=use_cache,
            **cache_kwargs(base, prefix.cache),
        )
    cache = output_cache(out) if use_cache else None
    return out.last_hidden_state, cache, prefix


logger = logging.getLogger(__name__)

# Attention implementations that take a custom 4D additive mask (packed rows need one); flash kernels do not.
_PACKABLE_ATTENTION = ("sdpa", "eager")
# Longest packed sequence: its (N, P + N) mask and attention scores grow with the square of it.
MAX_PACKED_TOKENS = 4096
# False: every forward runs padded, never packed (for A/B measurements: the benchmarks' --no-pack).
PACKING = True


def packing_saves(model: nn.Module, lengths: Sequence[int], prompt_lens: Sequence[int]) -> bool:
    """Whether :func:`forward_packed` costs less than a left-padded batch for rows of ``lengths`` tokens behind
    distinct prompts of ``prompt_lens`` positions (multiply-accumulates per layer: each position's weights, plus
    attention over every key it is shown; packed rows see all N keys through the mask). Packing must save at
    least 10 %, :data:`PACKING` must be on, the attention implementation must take a custom mask, N must stay under
    :data:`MAX_PACKED_TOKENS`, on sliding-window models every row with its prompt must fit in one window, and the
    model must pass a one-off check that packing reproduces its padded forward."""
    n, width = sum(lengths), max(lengths)
    if n > MAX_PACKED_TOKENS or not _block_mask_allowed(model, width + max(prompt_lens, default=0)):
        return False
    layer = decoder_layers(model)[0]
    weights = sum(p.numel() for p in layer.parameters())
    two_d = 2 * model.config.hidden_size
    padded = len(lengths) * width * (weights + two_d * (max(prompt_lens, default=0) + width))
    packed = n * (weights + two_d * (sum(prompt_lens) + n))
    return packed < 0.9 * padded and _packing_matches(model)


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window in positions (Mistral, Gemma 2 / 3, Phi-3 ...), ``None`` when it attends to
    every earlier position (no window, or one its config turns off)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or not getattr(text, "use_sliding_window", True):
        return None
    types = getattr(text, "layer_types", None)
    if types and not any("sliding" in str(t) for t in types):
        return None
    return window


def window_groups(
    model: nn.Module, lengths: Sequence[int], prompt_lens: Sequence[int], extra: int
) -> list[list[int]] | None:
    """Where one left-padded batch would not give each row its own result on a sliding-window model, the rows in
    groups that do: ``None`` when it does, else the row indices grouped by length (in order of first appearance).

    A sliding window counts cache slots, not positions, and a padded row's padding sits between its soft prompt and
    its tokens: a row shorter than the batch would see less of its prompt and early tokens than alone once its
    prompt + the batch width + ``extra`` later positions (label or generated tokens) exceed the window. Rows of
    equal length have no padding between prompt and tokens (prompts are right-aligned), so each group is exact."""
    window = sliding_window(model)
    if window is None or not lengths:
        return None
    width = max(lengths)
    if all(n == width or p + width + extra <= window for n, p in zip(lengths, prompt_lens)):
        return None
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return list(groups.values())


def _block_mask_allowed(model: nn.Module, span: int) -> bool:
    """Whether a custom block mask may stand in for the model's attention over sequences of ``span`` positions:
    :data:`PACKING` on, an attention implementation that takes a custom mask, and on sliding-window models
    ``span`` within one window (the block mask is full attention: the same as a sliding window only within one
    window). The one-off :func:`_packing_matches` check comes on top."""
    config = model.config
    if not PACKING or getattr(config, "_attn_implementation", None) not in _PACKABLE_ATTENTION:
        return False
    window = sliding_window(model)
    return not (window and span > window)


def _additive_mask(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``allow`` mask (True: may attend) as the additive mask the model takes: 0 or the dtype's min."""
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, torch.finfo(dtype).min)


# Per model: whether a packed forward reproduces the padded one (checked once, on first use).
_PACKING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packing_matches(model: nn.Module) -> bool:
    """Whether :func:`forward_packed` gives this model's padded results: checked once per model on two short
    rows (one behind a 2-position prompt), so an architecture that derives positions from the padding mask or
    biases attention by absolute key position (ALiBi) is never packed."""
    verdict = _PACKING_CHECKED.get(model)
    if verdict is None:
        verdict = _check_packing(model)
        _PACKING_CHECKED[model] = verdict
        if not verdict:
            logger.info("%s: packed forwards differ from padded ones; batches stay padded", type(model).__name__)
    return verdict


def _check_packing(model: nn.Module) -> bool:
    dev = model_device(model)
    param = next(model.parameters())
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    gen = torch.Generator().manual_seed(0)
    scale = model.get_input_embeddings().weight.detach().float().std().item()
    prompt = {0: (scale * torch.randn(2, model.config.hidden_size, generator=gen)).to(dev, param.dtype)}
    try:
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # the check is in the weights' dtype
            kv = prompt_kv(model, prompt)
            packed, starts, _ = forward_packed(model, seqs, [kv, None])
            mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=dev)
            ids = torch.tensor([[0, 0, 0, *seqs[0]], seqs[1]], device=dev)
            padded, _, _ = forward_hidden(model, ids, mask, [kv, None])
    except Exception as e:  # an architecture that refuses a custom mask or a prefix cache
        logger.debug("packing check failed: %s", e)
        return False
    got = torch.cat([packed[s : s + len(q)] for s, q in zip(starts, seqs)]).float()
    want = torch.cat([padded[0, 3:], padded[1]]).float()
    tol = 1e-3 if param.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()))


def forward_packed(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    row_kv: Sequence[PrefixKV | None],
    *,
    use_cache: bool = False,
    read: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[int], PrefixBatch | None]:
    """Final hidden states of variable-length token rows behind per-row soft prompts, with no padding.

    The rows run as one sequence of ``N = sum(len)`` tokens behind the distinct prompts' key/value prefixes laid
    end to end (each once, however many rows share it); a 4D additive mask lets each token see its own prompt and
    the earlier tokens of its own row only, and position ids restart at each row's prompt length, so every row
    gets the same result as a padded batch (up to floating-point order). Returns ``(hidden (N, d), starts,
    padded)``, ``starts[b]`` the offset of row ``b``'s first token; with ``use_cache``, ``padded`` is the
    :class:`PrefixBatch` that :func:`forward_hidden` would have left (each row's prompt and token keys/values laid
    out left-padded, with its attention mask and position ids), to continue the rows from; else ``None``.
    ``read``: the positions of the N the caller will read (``starts[b] + t``), as in :func:`forward_hidden`.
    Differentiable with respect to the prompts.
    """
    dev = model_device(model)
    distinct: list[PrefixKV] = []
    slot: dict[int, int] = {}
    for kv in row_kv:
        if kv is not None and id(kv) not in slot:
            slot[id(kv)] = len(distinct)
            distinct.append(kv)
    prompt_lens = [kv[0][0].shape[2] for kv in distinct]
    prompt_at = [sum(prompt_lens[:i]) for i in range(len(distinct))]
    p_total = sum(prompt_lens)
    lengths = [len(s) for s in seqs]
    n = sum(lengths)
    allow = torch.zeros(n, p_total + n, dtype=torch.bool, device=dev)
    positions, starts, row_prompt_at = [], [], []
    start = 0
    for length, kv in zip(lengths, row_kv):
        p = 0 if kv is None else kv[0][0].shape[2]
        at = 0 if kv is None else prompt_at[slot[id(kv)]]
        allow[start : start + length, at : at + p] = True
        own = slice(p_total + start, p_total + start + length)
        allow[start : start + length, own] = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        positions += range(p, p + length)
        starts.append(start)
        row_prompt_at.append(at)
        start += length
    mask = _additive_mask(allow[None, None], next(model.parameters()).dtype)  # (1, 1, N, P_total + N)
    cache = None
    if distinct:
        layers = [
            (torch.cat([kv[i][0] for kv in distinct], 2), torch.cat([kv[i][1] for kv in distinct], 2))
            for i in range(len(distinct[0]))
        ]
        cache = DynamicCache(layers, config=model.config)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev)[None]
    base = model.base_model
    if use_cache and cache is None:
        cache = DynamicCache(config=model.config)
    with _reading_if(model, read, n):
        out = base(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=dev)[None],
            use_cache=use_cache,
            **cache_kwargs(base, cache),
        )
    padded = None
    if use_cache:
        padded = _unpack_cache(model, output_cache(out), row_kv, lengths, starts, row_prompt_at, p_total)
    return out.last_hidden_state[0], starts, padded


def segments_fit(model: nn.Module, cache_len: int, width: int) -> bool:
    """Whether :func:`forward_segments` can continue rows cached over ``cache_len`` positions with segments laid
    out over ``width`` positions: it needs what packing needs (:data:`PACKING` on, an attention implementation
    that takes a custom mask, a model that passes the one-off packing check) and, on sliding-window models,
    everything inside one window."""
    return _block_mask_allowed(model, cache_len + width) and _packing_matches(model)


def forward_segments(
    model: nn.Module, prefix: PrefixBatch, cache: DynamicCache, segments: Sequence[Sequence[Sequence[int]]]
) -> tuple[torch.Tensor, list[list[int]]]:
    """Continue every cached row with several independent token segments side by side, in one forward.

    ``prefix`` / ``cache``: the layout and key/value cache a padded batch leaves (:func:`forward_hidden` or
    :func:`forward_packed` with ``use_cache``). ``segments[b]``: the token lists row ``b`` continues with. A 4D
    mask lets each segment see its row's cached positions and its own earlier tokens only, never the other
    segments, and its position ids continue from the row's last one: each segment gets what it would get as its
    row's only continuation (up to floating-point order), without a copy of the row's cache per segment.
    Returns ``(hidden (B, W, d), offsets)``, ``offsets[b][i]`` the column of segment ``i`` of row ``b``. The
    cache is left as it was (the keys/values this forward appends are dropped). Differentiable.
    """
    dev = prefix.attention_mask.device
    bsz, k_len = prefix.attention_mask.shape
    width = max(1, max(sum(len(s) for s in row) for row in segments))
    ids = torch.zeros(bsz, width, dtype=torch.long)
    positions = torch.zeros(bsz, width, dtype=torch.long)
    own = torch.zeros(bsz, width, width, dtype=torch.bool)
    offsets = []
    for b, row in enumerate(segments):
        at, row_offsets = 0, []
        for seg in row:
            n = len(seg)
            ids[b, at : at + n] = torch.tensor(seg, dtype=torch.long)
            positions[b, at : at + n] = torch.arange(n)
            own[b, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            row_offsets.append(at)
            at += n
        own[b, at:, at:] = torch.eye(width - at, dtype=torch.bool)  # padding sees itself (and the row's cache)
        offsets.append(row_offsets)
    seen = prefix.attention_mask.bool()[:, None, :].expand(bsz, width, k_len)
    allow = torch.cat([seen, own.to(dev)], dim=2)  # (B, W, K + W)
    mask = _additive_mask(allow[:, None], next(model.parameters()).dtype)  # (B, 1, W, K + W)
    start = prefix.position_ids[:, -1:] + 1  # (B, 1): each row's next position
    saved = [dict(vars(layer)) for layer in cache.layers]  # keys, values and any length counters
    base = model.base_model
    try:
        out = base(
            input_ids=ids.to(dev),
            attention_mask=mask,
            position_ids=start + positions.to(dev),
            use_cache=True,
            **cache_kwargs(base, cache),
        )
    finally:  # drop the appended keys/values: the cache holds the rows alone again
        for layer, state in zip(cache.layers, saved):
            vars(layer).clear()
            vars(layer).update(state)
    return out.last_hidden_state, offsets


def _unpack_cache(model, cache, row_kv, lengths, starts, prompt_at, p_total) -> PrefixBatch:
    """The packed sequence's keys/values (1, kv_heads, P_total + N, hd) per layer, gathered into the left-padded
    batch layout of :func:`forward_hidden` (B, kv_heads, P_max + T, hd): what a padded forward with ``use_cache``
    would have cached, padding slots pointing at any key (they are masked)."""
    dev = cache.layers[0].keys.device
    width = max(lengths)
    token_mask = torch.zeros(len(lengths), width, dtype=torch.long, device=dev)
    for b, length in enumerate(lengths):
        token_mask[b, width - length :] = 1
    attention_mask, positions, p_max = _padded_layout(row_kv, token_mask)
    gather = torch.zeros(len(lengths), p_max + width, dtype=torch.long)
    for b, (length, start, kv) in enumerate(zip(lengths, starts, row_kv)):
        p = 0 if kv is None else kv[0][0].shape[2]
        gather[b, p_max - p : p_max] = torch.arange(prompt_at[b], prompt_at[b] + p)
        gather[b, p_max + width - length :] = torch.arange(p_total + start, p_total + start + length)
    flat = gather.reshape(-1).to(dev)
    layers = []
    for layer in cache.layers:
        k, v = layer.keys[0], layer.values[0]  # (kv_heads, P_total + N, hd)
        shape = (k.shape[0], len(lengths), p_max + width, k.shape[2])
        layers.append(
            tuple(t.index_select(1, flat).reshape(shape).transpose(0, 1) for t in (k, v))  # (B, kvh, P_max + T, hd)
        )
    return PrefixBatch(DynamicCache(layers, config=model.config), attention_mask, positions, p_max)


# --------------------------------------------------------------------------------------------------
# The last decoder layer's per-position work only where its output is read
# --------------------------------------------------------------------------------------------------

# False: the last decoder layer always runs in full (for A/B measurements: the benchmarks' --no-prune).
PRUNING = True
# The last decoder layer's sub-modules that act on each position alone and whose output at a position feeds only
# that position's final hidden state: the feed-forward block and the attention's query and output projections.
# (Its keys and values are needed at every position: each read position attends to all earlier ones.)
_PER_POSITION = ("mlp", "feed_forward", "self_attn.q_proj", "self_attn.o_proj", "attn.c_proj")
# (flat row indices, total positions) of the forward in progress in this thread (and context), or None
_READ_ROWS: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = contextvars.ContextVar(
    "promptbank_read_rows", default=None
)
# Per model: whether its last layer's per-position sub-modules were found and pruning reproduces its forward
_PRUNING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows_only_forward(self, *args, **kwargs):
    """The ``forward`` installed on the last decoder layer's per-position sub-modules: inside :func:`reading`,
    for the forward of ``total`` positions it was set for, the module runs on the read rows only and gives zeros
    at every other position (nothing downstream reads them); otherwise the module's own forward, unchanged."""
    forward = type(self).forward
    spec = _READ_ROWS.get()
    x = args[0] if args else None
    if spec is None or not torch.is_tensor(x) or x.dim() < 2 or x.shape[:-1].numel() != spec[1]:
        return forward(self, *args, **kwargs)
    rows, total = spec
    rows = rows.to(x.device)
    picked = x.reshape(total, x.shape[-1]).index_select(0, rows)[None]  # (1, R, d_in)
    out = forward(self, picked, *args[1:], **kwargs)[0]  # (R, d_out)
    full = out.new_zeros(total, out.shape[-1]).index_copy(0, rows, out)
    return full.view(*x.shape[:-1], out.shape[-1])


# as a bound method it pickles as getattr(module, "forward"): an unpickled model gets its class's forward back
_rows_only_forward.__name__ = _rows_only_forward.__qualname__ = "forward"


def _per_position_modules(model: nn.Module) -> list[nn.Module]:
    layer = decoder_layers(model)[-1]
    found = []
    for path in _PER_POSITION:
        obj = layer
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        # a forward someone else replaced on the instance (accelerate's offloading hooks, ...) is left alone
        own = vars(obj).get("forward") if isinstance(obj, nn.Module) else None
        if isinstance(obj, nn.Module) and (own is None or getattr(own, "__func__", None) is _rows_only_forward):
            found.append(obj)
    return found


def _prunable(model: nn.Module) -> bool:
    """Whether :func:`reading` can skip work on this model: its per-position sub-modules get the row-selecting
    forward once, and a one-off check on two short rows must give the full forward's hidden states at the read
    positions; otherwise the forward is put back and the model always runs in full."""
    verdict = _PRUNING_CHECKED.get(model)
    if verdict is None:
        verdict = _install_pruning(model)
        _PRUNING_CHECKED[model] = verdict
        if not verdict:
            logger.info(
                "%s: the last layer cannot run on the read positions alone; it runs in full", type(model).__name__
            )
    return verdict


def _install_pruning(model: nn.Module) -> bool:
    try:
        modules = _per_position_modules(model)
    except TypeError:  # no decoder layers found
        return False
    if not modules:
        return False
    for module in modules:
        module.forward = types.MethodType(_rows_only_forward, module)
    dev = model_device(model)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], device=dev)
    rows = [4, 6]
    training = model.training
    if training:
        model.eval()  # dropout would make the two forwards differ
    try:
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # the check is in the weights' dtype
            full = model.base_model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
            token = _READ_ROWS.set((torch.tensor(rows, device=dev), ids.numel()))
            try:
                part = model.base_model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
            finally:
                _READ_ROWS.reset(token)
        want, got = full[rows].float(), part[rows].float()
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
        ok = bool(torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()))
    except Exception as e:  # a sub-module that is not per-position after all (a tuple output, ...)
        logger.debug("pruning check failed: %s", e)
        ok = False
    finally:
        if training:
            model.train()
    if not ok:
        for module in modules:
            module.__dict__.pop("forward", None)  # (another thread's first use may have put it back already)
    return ok


@contextlib.contextmanager
def reading(model: nn.Module, rows: Sequence[int], total: int) -> Iterator[None]:
    """While active, a forward of ``model`` over ``total`` positions (the B x T of its input ids) computes its last
    decoder layer's feed-forward block and its attention's query and output projections only at the flat
    positions ``rows`` (``b * T + t``): the final hidden states are exact there and undefined elsewhere, and the
    last layer's keys and values (a cache it returns) are exact everywhere. Saves nearly one layer's work per
    unread position (SmolLM2-135M: ~3 % of a forward where only the targets of a training batch are read).
    Does nothing with :data:`PRUNING` off, when more than half the positions are read, or on a model that fails
    the one-off check (:func:`_prunable`). Per thread: forwards that other threads run meanwhile run in full."""
    if not PRUNING or len(rows) * 2 > total or not _prunable(model):
        yield
        return
    token = _READ_ROWS.set((torch.tensor(list(rows), dtype=torch.long, device=model_device(model)), total))
    try:
        yield
    finally:
        _READ_ROWS.reset(token)


def _reading_if(model: nn.Module, read: Sequence[int] | None, total: int):
    """:func:`reading` where ``read`` is given, else nothing."""
    return contextlib.nullcontext() if read is None else reading(model, read, total)
