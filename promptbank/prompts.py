"""Trainable soft-prompt modules. Each produces a soft prompt ``{layer: (P, d)}`` (see :mod:`promptbank.inject`).

- :class:`PromptTuning` — ``P`` free input vectors (Lester et al. 2021).
- :class:`PTuningEncoder` — P-Tuning v1 (Liu et al. 2021): input vectors produced by an MLP or bidirectional
  LSTM prompt encoder. The encoder is residual around its initial vectors with a zero-initialised output layer,
  so training starts exactly at the initial (vocab-sampled or warm-started) prompt. After training it is
  folded into a plain tensor (:meth:`SoftPromptModule.fold`); its state is kept to resume training.
- :class:`DeepPrompt` — P-Tuning v2 (Liu et al. 2022): independent vectors entering every chosen layer.
"""

from __future__ import annotations

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
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (1, P, d) -> (P, 2*(hidden//2))
        return {0: self.base + self.mlp(x)}  # (P, d)


class DeepPrompt(SoftPromptModule):
    def __init__(self, init: dict[int, torch.Tensor]):
        super().__init__()
        self.layers = sorted(init)
        self.vectors = nn.ParameterDict(
            {str(layer): nn.Parameter(init[layer].detach().float().clone()) for layer in self.layers}
        )

    def forward(self) -> dict[int, torch.Tensor]:
        return {layer: self.vectors[str(layer)] for layer in self.layers}


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
def vocab_init(
    model: nn.Module, layers: list[int], num_tokens: int, *, generator: torch.Generator, max_vocab: int = 5000
) -> dict[int, torch.Tensor]:
    """Initial soft prompt from real tokens: embeddings of ``num_tokens`` token ids sampled from the first
    ``max_vocab`` of the vocabulary (frequent tokens in BPE vocabularies), and for deeper layers the hidden
    states those tokens produce entering each layer, so every vector starts at a natural scale.
    """
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    ids = torch.randint(0, min(vocab, max_vocab), (1, num_tokens), generator=generator)
    out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    # hidden_states[l] is the input of decoder layer l (hidden_states[0] = embeddings).
    return {layer: out.hidden_states[layer][0].float().clone() for layer in layers}
