"""Causal-LM operations behind per-row soft prompts: encode, loss, label ranking, generation.

Every function takes ``row_kv``: one :func:`promptbank.inject.prompt_kv` result per row (the same object for rows
sharing a task) or ``None`` for a row with no soft prompt. Logits are computed only where they are needed
(target positions, label positions, the last position when decoding), never for the whole sequence.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .inject import (
    PrefixKV,
    cache_kwargs,
    forward_hidden,
    forward_packed,
    forward_segments,
    model_device,
    output_cache,
    packing_saves,
    segments_fit,
    window_groups,
)

logger = logging.getLogger(__name__)

# How an example's input is shown to the model behind its soft prompt; the target follows after a space.
DEFAULT_TEMPLATE = "{input}\nAnswer:"


# Per model: the function from final hidden states to the logits its own forward returns (found once, on first use).
_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOGITS_LOCK = threading.Lock()


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits of final hidden states ``hidden`` (..., d): the model's output embeddings and whatever its
    own forward does to their result. Most causal LMs return the output embeddings' product as it is; some scale or
    soft-cap it (Gemma 2 / 3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``),
    which changes the loss, the label ranking and sampling (not greedy decoding). Which of these applies is checked
    once per model against its own forward (:func:`_find_logits`); a model matching none of them gets the plain
    product, with one warning."""
    return logits_fn(model)(hidden)


def logits_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`lm_logits` of ``model`` as a function of the hidden states."""
    fn = _LOGITS.get(model)
    if fn is None:
        with _LOGITS_LOCK:
            fn = _LOGITS.get(model)
            if fn is None:
                fn = _LOGITS[model] = _find_logits(model)
    return fn


def _logit_candidates(model: nn.Module) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Named ways from the output embeddings' product to the model's logits, the plain product first."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [("plain", lambda x: x)]
    cap = getattr(text, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0:
        out.append((f"soft-capped at {cap}", lambda x, c=float(cap): torch.tanh(x / c) * c))
    scales = {
        "logit_scale": getattr(model, "logit_scale", None),
        "config.logit_scale": getattr(text, "logit_scale", None),
        "lm_head_multiplier": getattr(getattr(model, "model", None), "lm_head_multiplier", None),
    }
    for name, value in scales.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out.append((f"times {name} {value}", lambda x, v=float(value): x * v))
    value = getattr(text, "logits_scaling", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:  # divided or multiplied
        out.append((f"divided by logits_scaling {value}", lambda x, v=float(value): x / v))
        out.append((f"times logits_scaling {value}", lambda x, v=float(value): x * v))
    return out


def _find_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    head = model.get_output_embeddings()
    candidates = _logit_candidates(model)
    dev = model_device(model)
    ids = torch.tensor([[1, 2, 3, 4]], device=dev)
    try:
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # the check is in the weights' dtype
            want = model(input_ids=ids, use_cache=False).logits[0].float()
            raw = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state)[0].float()
    except Exception as e:  # a model whose forward takes other inputs: keep the plain product
        logger.debug("logits check failed: %s", e)
        return candidates[0][1]
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    for name, fn in candidates:
        if torch.allclose(fn(raw), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0)):
            if name != "plain":
                logger.info("%s: logits are the output embeddings' product %s", type(model).__name__, name)
                return lambda x, fn=fn, head=head: fn(head(x))
            return head
    warnings.warn(
        f"{type(model).__name__}'s forward changes its logits in a way promptbank does not know (not a scaling or "
        "soft-capping of the output embeddings' product); losses, label scores and sampling use that product as "
        "it is",
        UserWarning,
        stacklevel=3,
    )
    return head


def bos_text(tokenizer) -> str | None:
    """The beginning-of-sequence token as text, where the tokenizer starts every text with it by default (Llama,
    Gemma, Mistral ...: their models were trained with it first), else ``None`` (GPT-2, Qwen, SmolLM2 ...). Only a
    token that reads back as itself from its text counts."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, str) or not bos or bos_id is None:
        return None
    key = (bos, bos_id)
    try:
        known = _BOS.get(tokenizer)
    except TypeError:  # not weakly referable: no memo
        known = None
    if known is not None and known[0] == key:
        return known[1]
    try:
        default = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        as_text = tokenizer(bos, add_special_tokens=False)["input_ids"]
    except Exception:
        return None
    found = bos if default[:1] == [bos_id] and plain[:1] != [bos_id] and list(as_text) == [bos_id] else None
    try:
        _BOS[tokenizer] = (key, found)
    except TypeError:
        pass
    return found


# Per tokenizer: ((bos token, id), bos_text's answer), so that a per-row caller does not re-tokenize
_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_bos(tokenizer, template: str) -> str:
    """``template`` with the tokenizer's :func:`bos_text` in front (unless it starts with it already): a task's
    inputs then start as the tokenizer starts any text, right after the soft prompt, as in PEFT, where the prompt
    goes before the tokenized input. Templates of tokenizers without one are unchanged."""
    bos = bos_text(tokenizer)
    return template if bos is None or template.startswith(bos) else bos + template


def encode_input(tokenizer, text: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of ``text`` in ``template``, no special tokens added. A templated text that starts with the
    tokenizer's :func:`bos_text` is encoded as the BOS id followed by the rest, so that the rest tokenizes as the
    start of a text does (SentencePiece tokenizers treat text right after a special token differently), the ids the
    tokenizer itself gives the text without the BOS prefix."""
    full = template.format(input=text)
    bos = bos_text(tokenizer)
    if bos is not None and full.startswith(bos):
        return [tokenizer.bos_token_id, *tokenizer(full[len(bos) :], add_special_tokens=False)["input_ids"]]
    return tokenizer(full, add_special_tokens=False)["input_ids"]


def encode_target(tokenizer, target: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``" " + target`` followed by EOS (so label ranking prefers complete labels and
    generation learns to stop). Over-long targets are cut to ``max_tokens`` (EOS kept)."""
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if max_tokens is not None and len(ids) >= max_tokens:
        ids = ids[: max_tokens - 1]
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None else [])


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of left-padded sequences, built on the CPU and moved to ``device`` (if given)
    in one copy each."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def target_logprobs(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pack: bool | None = None,
) -> list[torch.Tensor]:
    """Log-probability of each target token given its input, behind each row's soft prompt.

    Returns one (len(target_b),) tensor per row. Only target positions go through the LM head, and the last target
    token is not fed (nothing scores its output). Rows of different
    lengths run packed, without padding (:func:`promptbank.inject.forward_packed`), where that costs less
    (``pack=None``: :func:`promptbank.inject.packing_saves`); ``pack=True`` / ``False`` forces either way. Both
    give the same values up to floating-point order.
    """
    # the last target token is never fed: nothing after it is scored (its output would predict the next token)
    seqs = [list(i) + list(t[:-1]) for i, t in zip(inputs, targets)]
    groups = window_groups(model, [len(s) for s in seqs], _prompt_lens(row_kv), 0)
    if groups is not None:  # a sliding window that padding would stretch: rows of equal length together
        return _merge(
            groups, len(seqs), lambda g: target_logprobs(model, tokenizer, *_pick(g, row_kv, inputs, targets))
        )
    dev = model_device(model)
    if pack is None:
        pack = should_pack(model, seqs, row_kv)
    pos, tgt, sizes = [], [], []
    if pack:  # rows one after another
        ends = list(itertools.accumulate(len(s) for s in seqs))
    else:  # rows right-aligned in a (B, width) batch
        width = max(len(s) for s in seqs)
        ends = [(b + 1) * width for b in range(len(seqs))]
    for end, t in zip(ends, targets):
        first = end - len(t)  # the position that predicts the first target token (the input's last)
        pos += list(range(first, first + len(t)))
        tgt += list(t)
        sizes.append(len(t))
    if pack:
        hidden, _, _ = forward_packed(model, seqs, row_kv, read=pos)  # (N, d)
    else:
        ids, mask = left_pad(seqs, _pad_id(tokenizer), dev)
        padded, _, _ = forward_hidden(model, ids, mask, row_kv, read=pos)  # (B, T, d)
        hidden = padded.reshape(-1, padded.shape[-1])
    selected = hidden[torch.tensor(pos, device=dev)]  # (N_targets, d)
    logits = lm_logits(model, selected).float()  # (N, V)
    logp = -F.cross_entropy(logits, torch.tensor(tgt, device=dev), reduction="none")  # (N,)
    return list(torch.split(logp, sizes))


def _prompt_lens(row_kv: Sequence[PrefixKV | None]) -> list[int]:
    return [0 if kv is None else int(kv[0][0].shape[2]) for kv in row_kv]


def _pick(rows: Sequence[int], *columns: Sequence) -> list[list]:
    """The entries ``rows`` of each per-row sequence in ``columns``."""
    return [[col[i] for i in rows] for col in columns]


def _merge(groups: Sequence[Sequence[int]], n: int, run: Callable[[Sequence[int]], list]) -> list:
    """Per-row results of ``run`` on each group of row indices, back in row order."""
    out: list = [None] * n
    for g in groups:
        for i, value in zip(g, run(g)):
            out[i] = value
    return out


def _merged_steps(groups, n: int, steps: list[Iterator[list[int | None]]]) -> Iterator[list[int | None]]:
    """One step of every group's decoding per yield, as one row-ordered list (``None`` for a finished group's
    rows); ends when every group has ended. Closing it closes them all."""
    try:
        live = list(range(len(groups)))
        while live:
            row: list[int | None] = [None] * n
            for k in list(live):
                new = next(steps[k], None)
                if new is None:
                    live.remove(k)
                    continue
                for i, token in zip(groups[k], new):
                    row[i] = token
            if live:
                yield row
    finally:
        for s in steps:
            s.close()


def should_pack(model, seqs, row_kv) -> bool:
    """Whether rows ``seqs`` (token lists) behind prompt prefixes ``row_kv`` run packed by default
    (:func:`promptbank.inject.packing_saves` for their lengths and distinct prompts)."""
    prompt_lens = {id(kv): kv[0][0].shape[2] for kv in row_kv if kv is not None}
    return packing_saves(model, [len(s) for s in seqs], list(prompt_lens.values()))


def lm_loss(model, tokenizer, row_kv, inputs, targets) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch."""
    return -torch.cat(target_logprobs(model, tokenizer, row_kv, inputs, targets)).mean()


@torch.no_grad()
def rank_labels(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[Sequence[int]]],
    *,
    pack: bool | None = None,
) -> list[torch.Tensor]:
    """Sum log-likelihood of each candidate label of each row; returns one (n_labels_b,) tensor per row.
    :func:`label_scores` without gradients."""
    return label_scores(model, tokenizer, row_kv, inputs, label_ids, pack=pack)


def label_loss(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[Sequence[int]]],
    gold: Sequence[int],
    lm_weight: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of each row's gold label among its candidate labels, each label's sum log-likelihood
    (:func:`label_scores`, the score :func:`rank_labels` predicts with) as its logit; plus ``lm_weight`` x the
    gold label's mean per-token negative log-likelihood. Differentiable."""
    scores = label_scores(model, tokenizer, row_kv, inputs, label_ids)
    return label_cross_entropy(scores, gold, label_ids, lm_weight).mean()


def label_cross_entropy(
    scores: Sequence[torch.Tensor],
    gold: Sequence[int],
    label_ids: Sequence[Sequence[Sequence[int]]] | None = None,
    lm_weight: float = 0.0,
) -> torch.Tensor:
    """(n,) cross-entropy of each row's gold label given its labels' scores (:func:`label_scores`); with
    ``lm_weight``, plus that times the gold label's mean per-token negative log-likelihood (``label_ids`` gives
    the labels' token counts)."""
    terms = []
    for i, (s, g) in enumerate(zip(scores, gold)):
        t = torch.logsumexp(s, 0) - s[g]
        if lm_weight:
            t = t - lm_weight * s[g] / len(label_ids[i][g])
        terms.append(t)
    return torch.stack(terms)


def label_scores(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[Sequence[int]]],
    *,
    pack: bool | None = None,
) -> list[torch.Tensor]:
    """Sum log-likelihood of each candidate label of each row; returns one (n_labels_b,) tensor per row.

    Two forwards, whatever the number of labels: the inputs once (behind their soft prompts, keeping the
    key/value cache), then every label's remaining tokens at once, each row's labels side by side behind the
    row's cache (:func:`promptbank.inject.forward_segments`; more than :data:`LABEL_TOKENS_PER_FORWARD` label
    tokens take one more forward per that many). Models where a block mask cannot keep the labels apart
    (:func:`promptbank.inject.segments_fit`) run each (row, label) continuation on a copy of its row's cache
    instead, :data:`LABEL_PAIRS_PER_FORWARD` pairs per forward. The first label token is scored from the input's
    last position, so labels share the input's forward. Rows may use different tasks, prompt lengths and label
    sets. Inputs of different lengths run packed, without padding, where that costs less (``pack`` as in
    :func:`target_logprobs`); the continuations then use the same cache laid out padded.
    """
    extra = max((len(lab) for labels in label_ids for lab in labels), default=0)
    groups = window_groups(model, [len(i) for i in inputs], _prompt_lens(row_kv), extra)
    if groups is not None:  # as in target_logprobs
        return _merge(
            groups, len(inputs), lambda g: label_scores(model, tokenizer, *_pick(g, row_kv, inputs, label_ids))
        )
    dev = model_device(model)
    head = logits_fn(model)
    if pack is None:
        pack = should_pack(model, inputs, row_kv)
    if pack:  # only each row's last position is read: the labels continue from the cache
        ends = list(itertools.accumulate(len(i) for i in inputs))
        hidden, _, prefix = forward_packed(model, inputs, row_kv, use_cache=True, read=[e - 1 for e in ends])
        cache = prefix.cache
        last = hidden[torch.tensor([e - 1 for e in ends], device=dev)]  # (B, d)
    else:
        ids, mask = left_pad(inputs, _pad_id(tokenizer), dev)
        width = ids.shape[1]
        read = [(b + 1) * width - 1 for b in range(len(inputs))]
        padded, cache, prefix = forward_hidden(model, ids, mask, row_kv, use_cache=True, read=read)
        last = padded[:, -1]
    first_logp = torch.log_softmax(head(last).float(), dim=-1)  # (B, V)

    owner = [b for b, labels in enumerate(label_ids) for _ in labels]
    flat = [list(lab) for labels in label_ids for lab in labels]
    if any(not lab for lab in flat):
        raise ValueError("every label must have at least one token")
    index = torch.tensor(owner, device=dev)
    scores = first_logp[index, torch.tensor([lab[0] for lab in flat], device=dev)]  # (N,)
    sizes = [len(labels) for labels in label_ids]

    if max(len(lab) for lab in flat) > 1:
        # feed label tokens [0 .. n-2] to score tokens [1 .. n-1]: side by side behind each row's own cache where
        # the model allows, else each (row, label) pair on a copy of its row's cache
        widest = max(sum(len(lab) - 1 for lab in labels) for labels in label_ids)
        if segments_fit(model, prefix.attention_mask.shape[1], min(widest, _segment_budget(len(label_ids), flat))):
            return list(torch.split(scores + _shared_continuations(model, head, cache, prefix, label_ids), sizes))
        # in chunks of pairs, so that many labels do not copy the cache for all of them at once
        base = model.base_model
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        parts = []
        for s in range(0, len(flat), LABEL_PAIRS_PER_FORWARD):
            chunk = flat[s : s + LABEL_PAIRS_PER_FORWARD]
            sel = index[s : s + LABEL_PAIRS_PER_FORWARD]
            parts.append(_continuation_logprobs(base, head, tokenizer, layers, prefix, chunk, sel, model.config))
        scores = scores + torch.cat(parts)
    return list(torch.split(scores, sizes))


# (row, label) continuations scored in one forward by label_scores where they run on copies of their rows'
# caches; each holds a copy (SmolLM2-135M: ~2.3 MB per pair for 50 prompt + input positions), so this bounds
# that copy at ~0.6 GB
LABEL_PAIRS_PER_FORWARD = 256
# Label tokens fed per forward where a row's labels continue side by side behind its cache (rows x widest row):
# bounds the (rows, tokens, cache + tokens) mask and attention scores
LABEL_TOKENS_PER_FORWARD = 2048


def _segment_budget(rows: int, flat: Sequence[Sequence[int]]) -> int:
    """Label tokens per row per forward of :func:`_shared_continuations` (at least the longest label's)."""
    return max(LABEL_TOKENS_PER_FORWARD // max(rows, 1), max(len(lab) - 1 for lab in flat))


def _shared_continuations(model, head, cache, prefix, label_ids) -> torch.Tensor:
    """Sum log-probability of tokens [1 ..] of every label (flat (row, label) order; 0 for one-token labels)
    given its row's cache and the label's first token: each row's labels fed side by side behind the row's
    cache (:func:`promptbank.inject.forward_segments`), in as many forwards as :data:`LABEL_TOKENS_PER_FORWARD`
    needs, with no copy of the cache."""
    dev = model_device(model)
    flat = [lab for labels in label_ids for lab in labels]
    budget = _segment_budget(len(label_ids), flat)
    # per row, its multi-token labels (flat index, tokens fed) in rounds of at most `budget` fed tokens
    rounds: list[list[list[tuple[int, list[int]]]]] = []
    at = 0
    for b, labels in enumerate(label_ids):
        r, used = 0, 0
        for lab in labels:
            feed = list(lab[:-1])
            if feed:
                if used and used + len(feed) > budget:
                    r, used = r + 1, 0
                while len(rounds) <= r:
                    rounds.append([[] for _ in label_ids])
                rounds[r][b].append((at, feed))
                used += len(feed)
            at += 1
    out = torch.zeros(len(flat), device=dev)
    for chunk in rounds:
        hidden, offsets = forward_segments(model, prefix, cache, [[feed for _, feed in row] for row in chunk])
        rows, cols, tgts, owners = [], [], [], []
        for b, (row, offs) in enumerate(zip(chunk, offsets)):
            for (i, feed), off in zip(row, offs):
                rows += [b] * len(feed)
                cols += range(off, off + len(feed))
                tgts += flat[i][1:]
                owners += [i] * len(feed)
        logits = head(hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
        logp = -F.cross_entropy(logits, torch.tensor(tgts, device=dev), reduction="none")
        out = out.index_add(0, torch.tensor(owners, device=dev), logp)
    return out


def _continuation_logprobs(base, head, tokenizer, layers, prefix, labels, index, config) -> torch.Tensor:
    """Sum log-probability of tokens [1 ..] of each label given its row's cache and the label's first token
    (one (len(labels),) tensor; 0 for one-token labels). ``index[i]``: the batch row of ``labels[i]``."""
    dev = index.device
    width = max(len(lab) for lab in labels) - 1
    out = torch.zeros(len(labels), device=dev)
    if width <= 0:
        return out
    feed = torch.full((len(labels), width), _pad_id(tokenizer), dtype=torch.long)  # right-padded: pads come last
    feed_mask = torch.zeros((len(labels), width), dtype=torch.long)
    for i, lab in enumerate(labels):
        feed[i, : len(lab) - 1] = torch.tensor(lab[:-1], dtype=torch.long)
        feed_mask[i, : len(lab) - 1] = 1
    feed, feed_mask = feed.to(dev), feed_mask.to(dev)
    cache = DynamicCache([(k.index_select(0, index), v.index_select(0, index)) for k, v in layers], config=config)
    start = prefix.position_ids[:, -1][index] + 1  # (N,)
    hidden = base(
        input_ids=feed,
        attention_mask=torch.cat([prefix.attention_mask[index], feed_mask], dim=1),
        position_ids=start[:, None] + torch.arange(width, device=dev)[None],
        use_cache=True,
        **cache_kwargs(base, cache),
    ).last_hidden_state
    rows = [i for i, lab in enumerate(labels) for _ in lab[1:]]  # not empty: some label has 2+ tokens (width > 0)
    cols = [j for lab in labels for j in range(len(lab) - 1)]
    tgts = [t for lab in labels for t in lab[1:]]
    rows_t = torch.tensor(rows, device=dev)
    logits = head(hidden[rows_t, torch.tensor(cols, device=dev)]).float()  # (M, V)
    logp = -F.cross_entropy(logits, torch.tensor(tgts, device=dev), reduction="none")
    return out.index_add(0, rows_t, logp)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Decode new tokens for each row (greedy when ``temperature == 0``); an end token (:func:`end_token_ids`) ends
    a row and is not returned. ``on_step`` is called after each decoding step (a progress bar).

    One forward per step for the whole (possibly mixed-task) batch; see :func:`generate_steps`.
    """
    outputs: list[list[int]] = [[] for _ in inputs]
    ends = end_token_ids(model, tokenizer)
    for step in generate_steps(
        model,
        tokenizer,
        row_kv,
        inputs,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
    ):
        for out, tok in zip(outputs, step):
            if tok is not None and tok not in ends:
                out.append(tok)
        if on_step is not None:
            on_step()
    return outputs


def end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Tokens that end a generated answer: the tokenizer's EOS (a task's targets are trained to end with it) and the
    model's generation-config end tokens (chat models often end a turn with another: Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return {int(i) for i in ids if i is not None}


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator, a CUDA model
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_steps(
    model: nn.Module,
    tokenizer,
    row_kv: Sequence[PrefixKV | None],
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """:func:`generate` one step at a time: yield, per decoding step, the new token id of every row.

    Same forwards and sampling as :func:`generate` (same tokens for the same seed), but lazy: each ``next()`` runs
    one forward for the whole batch, so a caller can stream tokens, stop early (closing the generator runs no
    further forward) or hold a lock per step. A row's end token (:func:`end_token_ids`) is yielded once; after it
    the row yields ``None``. Iteration ends after ``max_new_tokens`` steps or once every row has ended.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    bsz = len(inputs)
    if max_new_tokens == 0 or bsz == 0:
        return
    groups = window_groups(model, [len(i) for i in inputs], _prompt_lens(row_kv), max_new_tokens)
    if groups is not None:  # as in target_logprobs: each group decodes on its own, one forward per group and step
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator)
        yield from _merged_steps(
            groups, bsz, [generate_steps(model, tokenizer, *_pick(g, row_kv, inputs), **options) for g in groups]
        )
        return
    ends = end_token_ids(model, tokenizer)
    ids, mask = left_pad(inputs, _pad_id(tokenizer), model_device(model))
    read = [(b + 1) * ids.shape[1] - 1 for b in range(bsz)]  # each row's last position: its first new token
    hidden, cache, prefix = forward_hidden(model, ids, mask, row_kv, use_cache=True, read=read)
    head = logits_fn(model)
    attn = prefix.attention_mask
    next_pos = prefix.position_ids[:, -1] + 1  # (B,)
    done = [False] * bsz
    last = hidden[:, -1]  # (B, d)
    base = model.base_model
    for step in range(max_new_tokens):
        nxt = _sample(head(last).float(), temperature, top_p, generator)  # (B,)
        new: list[int | None] = []
        for b in range(bsz):
            if done[b]:
                new.append(None)
            else:
                new.append(int(nxt[b]))
                done[b] = new[b] in ends
        yield new
        if all(done) or step == max_new_tokens - 1:
            return
        attn = torch.cat([attn, attn.new_ones(bsz, 1)], dim=1)
        out = base(
            input_ids=nxt[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            use_cache=True,
            **cache_kwargs(base, cache),
        )
        cache = output_cache(out)
        last = out.last_hidden_state[:, -1]
        next_pos = next_pos + 1


class IncrementalDetokenizer:
    """Token ids in, text out, one token at a time, never splitting a multi-byte character.

    Byte-level tokenizers can end a token inside a UTF-8 character, and decoding it alone gives U+FFFD. ``push``
    decodes a short window (the previous chunk plus the new ids, so tokenizers that treat a leading space
    specially are right) and holds the text back while it ends in U+FFFD; ``flush`` releases whatever is left.
    ``"".join(pushes) + flush()`` equals ``tokenizer.decode(ids, skip_special_tokens=...)``.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded as context
        self._read = 0  # end of the text already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _release(self, final: bool) -> str:
        old = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        if len(new) > len(old) and (final or not new.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return new[len(old) :]
        return ""

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became final (often ``""`` mid-character)."""
        self.ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """Release any held-back text (an incomplete character at the very end decodes as U+FFFD)."""
        return self._release(final=True)
