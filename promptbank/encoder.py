"""Soft prompts on a frozen BERT-family encoder (MiniLM, BERT, RoBERTa ...) for classification.

Same soft-prompt representation as for causal LMs — hidden states ``{layer: (P, d)}`` of ``P`` reserved
positions — applied by the recommended per-layer overwrite: the ``P`` positions are prepended to each row and
forward pre-hooks on the chosen layers overwrite their hidden states (per batch row, so one batch can mix tasks,
prompt lengths and rows without a prompt). Attention is bidirectional here, so the prompt positions' keys/values
depend on the input and cannot be cached as a prefix; the overwrite is exact and needs no hand-built key/value
tensors (which is where PEFT's prefix tuning breaks on BERT-family models).

The pooled output is the mean of the real tokens' final hidden states (prompt positions excluded; that is the
pooling all-MiniLM-L6-v2 was trained with); each task has a small linear head on it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .inject import find_layers, model_device

SoftPrompt = Mapping[int, torch.Tensor]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """Transformer blocks of a Hugging Face encoder (BERT-style ``encoder.layer`` or ``layers``)."""
    layers = find_layers(model, ("encoder.layer", "encoder.layers", "layers", "transformer.layer"))
    if layers is None:
        raise TypeError(f"cannot find the encoder layers of {type(model).__name__}")
    return layers


# Per model: the position id of a row's first token in its own forward (found once, on first use).
_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def position_offset(model: nn.Module) -> int:
    """Position id the model's own forward gives a row's first token: 0 for BERT-style embeddings,
    ``padding_idx + 1`` for the RoBERTa family (RoBERTa, XLM-R, CamemBERT ...), whose embeddings number positions
    from after the padding index. :func:`pooled` passes position ids explicitly (prompt positions come first), so
    it must start where the model would; which candidate does is checked once per model against its forward."""
    offset = _OFFSETS.get(model)
    if offset is None:
        offset = _OFFSETS[model] = _find_offset(model)
    return offset


def _find_offset(model: nn.Module) -> int:
    base = model.base_model
    pad = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    if not isinstance(pad, int) or pad < 0:
        return 0
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model_device(model)
    ids = torch.tensor([[(pad + k) % vocab for k in (3, 4, 5, 6)]], device=device)  # no padding token among them
    mask = torch.ones_like(ids)
    try:
        with torch.no_grad():
            want = base(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            for offset in (0, pad + 1):
                positions = torch.arange(ids.shape[1], device=device)[None] + offset
                got = base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state.float()
                if torch.allclose(got, want, rtol=1e-3, atol=1e-3 * max(want.abs().max().item(), 1.0)):
                    return offset
    except Exception:  # a model that takes no position ids: nothing to align
        return 0
    return 0


class _RowOverwrite:
    """Forward pre-hook: for rows in ``rows``, replace hidden states of positions ``[:P]`` with ``value``."""

    def __init__(self, value: torch.Tensor, rows: torch.Tensor):
        self.value = value  # (B, P, d)
        self.rows = rows  # (B,) bool
        self.thread = threading.get_ident()  # act only in the registering thread (shared models, many threads)

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor:
        p = self.value.shape[1]
        value, rows = self.value.to(hidden.device, hidden.dtype), self.rows.to(hidden.device)
        head = torch.where(rows[:, None, None], value, hidden[:, :p])
        return torch.cat([head, hidden[:, p:]], dim=1)  # (B, P + T, d)

    def __call__(self, module, args, kwargs=None):
        # kwargs=None: torch registers a with_kwargs hook in two steps (and removes it in two), so a forward in
        # another thread can call it in between without kwargs; such calls are not ours and change nothing.
        if threading.get_ident() != self.thread:
            return None
        if args:
            return (self._apply(args[0]), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=self._apply(kwargs["hidden_states"]))


def encode_texts(
    tokenizer, texts: Sequence[str], max_tokens: int | Sequence[int], side: str | Sequence[str] = "right"
) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens ([CLS] ... [SEP]), at most ``max_tokens`` in all (one cap for
    every text, or one per text): a longer text loses tokens on ``side`` (one for all, or one per text;
    :data:`promptbank.config.TRUNCATION_SIDES`), its special tokens kept."""
    from .tasks import check_truncation_side, cut_to_tokens

    caps = [max_tokens] * len(texts) if isinstance(max_tokens, int) else list(max_tokens)
    sides = [side] * len(texts) if isinstance(side, str) else list(side)
    if len(caps) != len(texts) or len(sides) != len(texts):
        raise ValueError(f"{len(caps)} caps and {len(sides)} sides for {len(texts)} texts")
    out, specials = [], None
    for text, cap, where in zip(texts, caps, sides):
        if check_truncation_side(where) != "right":  # cut the text first, as training inputs are cut
            if specials is None:
                specials = len(tokenizer("", add_special_tokens=True)["input_ids"])  # [CLS] [SEP]: 2
            text = cut_to_tokens(tokenizer, text, max(cap - specials, 1), where)
        out.append(tokenizer(text, add_special_tokens=True, truncation=True, max_length=cap)["input_ids"])
    return out


def pooled(
    model: nn.Module, tokenizer, seqs: Sequence[Sequence[int]], row_prompts: Sequence[SoftPrompt | None]
) -> torch.Tensor:
    """Mean-pooled final hidden states (B, d), in float32, of each token sequence behind its row's soft prompt
    (or none).

    Layout of a row: ``[P_max prompt positions | tokens | right padding]``; a row whose prompt is shorter than
    ``P_max`` has its first positions masked. Token position ids start where the model's own forward starts them
    (:func:`position_offset`: 0, or ``padding_idx + 1`` for the RoBERTa family), as without a prompt.
    """
    bsz = len(seqs)
    if len(row_prompts) != bsz:
        raise ValueError(f"got {len(row_prompts)} prompts for {bsz} rows")
    lens = [0 if p is None else p[0].shape[0] for p in row_prompts]
    p_max, width = max(lens), max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    offset = position_offset(model)
    ids = torch.full((bsz, p_max + width), pad, dtype=torch.long)
    mask = torch.zeros((bsz, p_max + width), dtype=torch.long)
    positions = torch.zeros((bsz, p_max + width), dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lens)):
        ids[b, p_max : p_max + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, p_max - n : p_max + len(s)] = 1
        positions[b, p_max : p_max + len(s)] = torch.arange(len(s)) + offset
    device = model_device(model)  # built on the CPU above, moved in one copy each
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)

    handles = []
    layers = encoder_layers(model)
    if p_max:
        dim = next(p for p in row_prompts if p is not None)[0].shape[1]
        for layer in sorted({layer for p in row_prompts if p is not None for layer in p}):
            if not 0 <= layer < len(layers):
                raise ValueError(f"soft prompt layer {layer} out of range for a {len(layers)}-layer encoder")
            rows = torch.tensor([p is not None and layer in p for p in row_prompts], device=device)
            value = torch.stack(
                [
                    _left_pad(p[layer].to(device), p_max)
                    if p is not None and layer in p
                    else torch.zeros(p_max, dim, device=device)
                    for p in row_prompts
                ]
            )  # (B, P_max, d)
            handles.append(layers[layer].register_forward_pre_hook(_RowOverwrite(value, rows), with_kwargs=True))
    try:
        out = model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, token_type_ids=torch.zeros_like(ids)
        )
    finally:
        for h in handles:
            h.remove()
    hidden = out.last_hidden_state[:, p_max:].float()  # (B, T, d): the real tokens only; heads are fp32
    tmask = mask[:, p_max:, None].to(hidden.dtype)
    return (hidden * tmask).sum(1) / tmask.sum(1).clamp_min(1.0)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else torch.cat([t.new_zeros(n - t.shape[0], t.shape[1]), t], dim=0)


class Head(nn.Module):
    """Per-task linear classifier on the pooled output: (B, d) -> (B, n_labels) logits."""

    def __init__(self, dim: int, n_labels: int):
        super().__init__()
        self.linear = nn.Linear(dim, n_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.linear.weight.detach().float().clone(),
            "bias": self.linear.bias.detach().float().clone(),
        }


def head_logits(
    head: Mapping[str, torch.Tensor], features: torch.Tensor, embeddings: torch.Tensor | None = None
) -> torch.Tensor:
    """Label scores of a stored head ``{"weight": (L, d), "bias": (L,)}`` on pooled features (B, d).

    A head with an embedding probe (``probe_weight`` (L, e), ``probe_bias`` (L,); see :func:`fit_probe`) needs the
    inputs' routing ``embeddings`` (B, e) and returns the sum of both models' log-probabilities (a product of the
    two experts; its argmax and its log-softmax are what the bank reports)."""
    logits = features @ head["weight"].to(features.device).T + head["bias"].to(features.device)
    if "probe_weight" not in head:
        return logits
    if embeddings is None:
        raise ValueError("this head has an embedding probe: pass the inputs' routing embeddings")
    return with_probe(logits, head, embeddings)


def with_probe(scores: torch.Tensor, head: Mapping[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """Label ``scores`` (B, L) combined with ``head``'s embedding probe on routing ``embeddings`` (B, e): the sum of
    both log-probabilities (a product of the two experts, unnormalised), in float32 on the scores' device."""
    return torch.log_softmax(scores.float(), -1) + probe_logprobs(head, embeddings.to(scores.device))


def probe_logprobs(head: Mapping[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """The embedding probe's label log-probabilities (B, L) for routing ``embeddings`` (B, e) (a head with
    ``probe_weight`` (L, e) and ``probe_bias`` (L,), see :func:`fit_probe`)."""
    w, b = head["probe_weight"].to(embeddings.device), head["probe_bias"].to(embeddings.device)
    return torch.log_softmax(embeddings.to(w.dtype) @ w.T + b, -1)


def fit_probe(
    embeddings, targets: Sequence[int], n_labels: int, c: float, *, sample_weight: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Multinomial logistic regression on frozen embeddings (n, e) -> ``{"probe_weight": (L, e), "probe_bias":
    (L,)}``: minimises ``c * sum_i s_i CE_i + ||W||^2 / 2`` (scikit-learn's ``C = c``; bias not penalised; ``s_i``
    the ``sample_weight``, default 1), full-batch L-BFGS in float64, deterministic. Labels absent from ``targets``
    get no special treatment (their bias falls)."""
    x = torch.as_tensor(embeddings, dtype=torch.float64)
    y = torch.as_tensor(list(targets), dtype=torch.long)
    if x.ndim != 2 or len(x) != len(y) or not len(y):
        raise ValueError(f"fit_probe needs (n, e) embeddings and n targets, got {tuple(x.shape)} and {len(y)}")
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c!r}")
    if sample_weight is not None:
        s = torch.as_tensor(list(sample_weight), dtype=torch.float64)
        if s.shape != (len(y),) or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"sample_weight must be {len(y)} finite weights >= 0")
    w = torch.zeros(n_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        if sample_weight is None:
            ce = nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum")
        else:
            ce = (s * nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")).sum()
        loss = c * ce + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {"probe_weight": w.detach().float().contiguous(), "probe_bias": b.detach().float().contiguous()}
