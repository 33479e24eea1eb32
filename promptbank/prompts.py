"""Trainable soft-prompt modules. Each produces a soft prompt ``{layer: (P, d)}`` (see :mod:`promptbank.inject`).

- :class:`PromptTuning` — ``P`` free input vectors (Lester et al. 2021).
- :class:`PTuningEncoder` — P-Tuning v1 (Liu et al. 2021): input vectors produced by an MLP or bidirectional
  LSTM prompt encoder. The encoder is residual around its initial vectors with a zero-initialised output layer,
  so training starts exactly at the initial (vocab-sampled or warm-started) prompt. After training it is
  folded into a plain tensor (:meth:`SoftPromptModule.fold`); its state is kept to resume training.
- :class:`DeepPrompt` — P-Tuning v2 (Liu et al. 2022): independent vectors entering every chosen layer.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import Method, PromptConfig


class SoftPromptModule(nn.Module):
    """Base class: ``forward()`` returns the current soft prompt ``{layer: (P, d)}``."""

    layers: list[int]

    def forward(self) -> dict[int, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def fold(self) -> dict[int, torch.Tensor]:
        """The soft prompt as plain detached fp32 tensors (encoders run once and folded away)."""
        return {layer: t.detach().float().clone().contiguous() for layer, t in self().items()}


class PromptTuning(SoftPromptModule):
    def __init__(self, init: dict[int, torch.Tensor]):
        super().__init__()
        self.layers = [0]
        self.embeddings = nn.Parameter(init[0].detach().float().clone())  # (P, d)

    def forward(self) -> dict[int, torch.Tensor]:
        return {0: self.embeddings}


class PTuningEncoder(SoftPromptModule):
    """P-Tuning v1 prompt encoder: ``prompt = init + head(body(emb))`` with ``head`` zero-initialised."""

    def __init__(self, init: dict[int, torch.Tensor], kind: str, hidden: int | None = None):
        super().__init__()
        if kind not in ("mlp", "lstm"):
            raise ValueError(f"P-Tuning encoder must be 'mlp' or 'lstm', got {kind!r}")
        self.layers = [0]
        self.kind = kind
        base = init[0].detach().float().clone()  # (P, d)
        d = base.shape[1]
        hidden = hidden or d
        self.register_buffer("base", base)
        self.embedding = nn.Parameter(base.clone())  # encoder input, (P, d)
        if kind == "lstm":
            self.lstm = nn.LSTM(d, hidden // 2 or 1, num_layers=2, bidirectional=True, batch_first=True)
            body_out = 2 * (hidden // 2 or 1)
        else:
            self.lstm = None
            body_out = d
        self.mlp = nn.Sequential(nn.Linear(body_out, hidden), nn.ReLU(), nn.Linear(hidden, d))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> dict[int, torch.Tensor]:
        x = self.embedding
        # The encoder is tiny and runs once per step: always in float32, also under bf16 mixed precision (oneDNN
        # has no bf16 LSTM on CPUs without AVX512-BF16: "could not create a primitive descriptor").
        with torch.autocast(x.device.type, enabled=False):
            if self.lstm is not None:
                x = self.lstm(x[None])[0][0]  # (1, P, d) -> (P, 2*(hidden//2))
            return {0: self.base + self.mlp(x)}  # (P, d)


class DeepPrompt(SoftPromptModule):
    """Independent vectors entering each chosen layer, stored relative to each layer's scale.

    Hidden states grow through the network (SmolLM2: RMS ~0.1 at the embeddings, ~3-30 deeper), so one absolute
    learning rate would barely move deep layers while overshooting layer 0. Each layer's vectors are parameterised
    as ``scale_l * v`` with ``scale_l`` the median per-vector RMS of its initial vectors: Adam's steps on ``v`` are
    then relative to the layer's own scale.
    """

    def __init__(self, init: dict[int, torch.Tensor]):
        super().__init__()
        self.layers = sorted(init)
        scales = {}
        params = {}
        for layer in self.layers:
            t = init[layer].detach().float()
            scale = t.pow(2).mean(-1).sqrt().median().clamp_min(1e-6)
            scales[str(layer)] = scale
            params[str(layer)] = nn.Parameter(t / scale)
        self.vectors = nn.ParameterDict(params)
        self.register_buffer("scales", torch.stack([scales[str(layer)] for layer in self.layers]))

    def forward(self) -> dict[int, torch.Tensor]:
        return {layer: self.vectors[str(layer)] * self.scales[i] for i, layer in enumerate(self.layers)}


def build_prompt_module(config: PromptConfig, init: dict[int, torch.Tensor]) -> SoftPromptModule:
    """The trainable module of ``config.method``, starting from ``init`` (``{layer: (P, d)}``)."""
    if config.method is Method.PROMPT_TUNING:
        return PromptTuning(init)
    if config.method is Method.PTUNING_MLP:
        return PTuningEncoder(init, "mlp", config.encoder_hidden)
    if config.method is Method.PTUNING_LSTM:
        return PTuningEncoder(init, "lstm", config.encoder_hidden)
    return DeepPrompt(init)


@torch.no_grad()
def token_init(
    model: nn.Module, token_ids: list[int], layers: list[int], *, causal: bool = True
) -> dict[int, torch.Tensor]:
    """Initial soft prompt from real tokens: their input embeddings, and for deeper layers the hidden states those
    tokens produce entering each layer, so every vector starts at a natural scale. Returns ``{layer: (P, d)}``."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=next(model.parameters()).device)
    extra = {"use_cache": False} if causal else {}
    out = model.base_model(input_ids=ids, output_hidden_states=True, **extra)
    # hidden_states[l] is the input of decoder layer l (hidden_states[0] = embeddings).
    return {layer: out.hidden_states[layer][0].float().clone() for layer in layers}


_PLACEHOLDER = re.compile(r"^(\[[^\]]*\]|<[^>]*>)$")  # [unused12], [CLS], <|endoftext|>, <pad>


def vocab_init_ids(
    model: nn.Module, num_tokens: int, *, generator: torch.Generator, max_vocab: int = 5000, tokenizer=None
) -> list[int]:
    """``num_tokens`` ids sampled from the first ``max_vocab`` of the vocabulary (frequent tokens in BPE
    vocabularies). With ``tokenizer``, special and placeholder tokens are never drawn (``[CLS]``, ``<|im_start|>``,
    BERT's ~1,000 ``[unused*]`` slots, whose embeddings were never trained)."""
    vocab = min(model.get_input_embeddings().weight.shape[0], max_vocab)
    allowed = list(range(vocab))
    if tokenizer is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        names = tokenizer.convert_ids_to_tokens(allowed)
        allowed = [i for i, t in zip(allowed, names) if i not in special and t and not _PLACEHOLDER.match(t)]
        if not allowed:
            raise ValueError("no ordinary tokens among the first max_vocab ids to initialise a soft prompt from")
    picks = torch.randint(0, len(allowed), (num_tokens,), generator=generator).tolist()
    return [allowed[i] for i in picks]


def text_init_ids(tokenizer, text: str, num_tokens: int) -> list[int]:
    """The tokens of ``text`` repeated/cut to exactly ``num_tokens`` (Lester et al.: prompts initialised from
    task-related words train faster and more stably than random ones)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]


def describe_task(kind: str, labels: list[str] | None, max_labels: int = 30) -> str:
    """A plain instruction naming the task's labels, used as the text initialisation of its soft prompt."""
    if kind == "classification" and labels:
        shown = ", ".join(labels[:max_labels]) + (", ..." if len(labels) > max_labels else "")
        return f"Classify the text. Answer with one label: {shown}. "
    return "Answer the request. "
