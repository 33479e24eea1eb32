"""Export of input-level soft prompts as ``prompt_embeds`` for vLLM (the scale-out serving path).

vLLM accepts a prompt given as embeddings instead of text: ``{"prompt_embeds": tensor}`` with shape
``(sequence_length, hidden_size)`` (schema ``vllm.inputs.EmbedsPrompt``), passed to ``LLM.generate`` when the
engine was created with ``LLM(model=..., enable_prompt_embeds=True)``, or sent base64-encoded (``torch.save``) in
the ``prompt_embeds`` field of a Completions request to ``vllm serve --enable-prompt-embeds``. These embeddings
replace the model's token-embedding lookup; nothing else changes. Sources:
https://docs.vllm.ai/en/stable/features/prompt_embeds/ and ``examples/offline_inference/prompt_embed_inference.py``
in the vLLM repository.

That is exactly the place where an input-level soft prompt (prompt tuning, P-Tuning v1 with an MLP or LSTM encoder)
enters the model: its ``P`` vectors are layer-0 hidden states in front of the input tokens. promptbank runs them
through the model once per task and keeps their keys/values as a prefix cache (:func:`promptbank.inject.prompt_kv`),
with the prompt at positions ``0..P-1`` and the input tokens at ``P..``; with causal attention that gives the same
result as one forward over the concatenation ``[prompt vectors; token embeddings]`` at positions ``0..P+T-1``, which
is what vLLM computes for a ``prompt_embeds`` request. Deep prompts (P-Tuning v2) overwrite the hidden states of
the prompt positions at several layers, which no input-level tensor can express; encoder banks classify with a
per-task head and do not generate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import causal

if TYPE_CHECKING:
    from .bank import PromptBank


def prompt_embeds(
    bank: PromptBank, texts: str | Sequence[str], task: str | Sequence[str | None] | None = None
) -> list[torch.Tensor]:
    """For each text, the input-embedding sequence the bank's own forward sees: one float32 CPU tensor ``(P + T,
    hidden_size)`` per text, ready for vLLM as ``{"prompt_embeds": tensor}``.

    ``task=None`` routes each text as :meth:`PromptBank.predict` does; a task name applies to every text; a list
    gives one task (or ``None``) per text. A text with a task gets its task's ``P`` soft-prompt vectors (the
    serving variant, as stored: P-Tuning encoders are already folded into plain vectors) followed by the ``T``
    token embeddings of ``template.format(input=text)`` tokenized with ``add_special_tokens=False`` - the same
    tokens, with no BOS, that ``predict`` and ``generate`` feed (a text longer than its classification
    task's ``max_input_tokens`` cut to it on its ``truncation_side``, as they and training cut it; generation tasks' inputs whole; no cut to
    the engine's position limit). A text routed to no task (or
    given ``None``) gets only the plain token embeddings of its input as ``generate`` answers it: the backbone's
    chat template with a generation prompt when it has one, else the raw text; ``T`` rows, no soft prompt.

    Values are what enters the model: the soft prompt is cast to the model's dtype first (as
    :func:`promptbank.inject.prompt_kv` does), token embeddings come from ``model.get_input_embeddings()``, and
    both are then widened to float32, which is exact (recent vLLM servers cast received ``prompt_embeds`` to the
    engine's dtype; run the engine in the bank's dtype for the same numbers).

    Raises ``ValueError`` for an encoder backbone, and for a task whose soft prompt enters deeper layers than the
    embeddings (method ``deep``), naming the task; ``TaskNotFoundError`` for an unknown task name. All tasks are
    checked before anything is computed.
    """
    from .bank import _as_texts, _max_input_tokens, _truncation_side
    from .tasks import cut_to_tokens

    if bank.is_encoder:
        raise ValueError(
            f"backbone {bank.backbone.name!r} is an encoder: its soft prompts feed per-task classification heads "
            "over bidirectional attention, while vLLM prompt_embeds serve causal LMs that generate text; "
            "use predict() on this bank"
        )
    texts = _as_texts(texts)
    names, _, _ = bank._resolve_tasks(texts, task)
    tasks = bank._tasks  # one snapshot of the task table for the whole call
    for name in dict.fromkeys(n for n in names if n is not None):
        _check_input_level(name, tasks[name].record.method.value, sorted(tasks[name].prompt))

    tok = bank.backbone.tokenizer
    out = []
    for text, name in zip(texts, names):
        if name is None:
            out.append(input_embeddings(bank.backbone.model, None, bank._plain_input(text)))
        else:
            t = tasks[name]
            cap = _max_input_tokens(t.record)
            cut = text if cap is None else cut_to_tokens(tok, text, cap, _truncation_side(t.record))  # as predict
            ids = causal.encode_input(tok, cut, t.record.template)
            out.append(input_embeddings(bank.backbone.model, t.prompt[0], ids))
    return out


def _check_input_level(name: str, method: str, layers: list[int]) -> None:
    """Raise unless the soft prompt enters the input embeddings only (layer 0), the one place vLLM can take it."""
    if layers != [0]:
        raise ValueError(
            f"task {name!r} cannot be exported as vLLM prompt_embeds: its {method} soft prompt enters decoder "
            f"layers {layers}, while prompt_embeds only replace the input embeddings (layer 0). Serve it with "
            f"promptbank, or with PEFT: bank.save() writes it to tasks/{name}/ as a PREFIX_TUNING adapter "
            "(its exact per-layer key/value cache) for PeftModel.from_pretrained. Input-level methods "
            "(prompt_tuning, ptuning_mlp, ptuning_lstm) export."
        )


@torch.no_grad()
def input_embeddings(
    model: torch.nn.Module, soft_prompt: torch.Tensor | None, token_ids: Sequence[int]
) -> torch.Tensor:
    """``[soft_prompt; embeddings of token_ids]`` as the model takes them (its dtype), returned float32 on CPU.

    ``soft_prompt`` is an input-level prompt ``(P, d)`` or ``None``; the result is ``(P + T, d)``.
    """
    embed = model.get_input_embeddings()
    dtype = next(model.parameters()).dtype
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=embed.weight.device)
    tokens = embed(ids).to(dtype).cpu()
    if soft_prompt is None:
        return tokens.float()
    return torch.cat([soft_prompt.to(dtype).cpu(), tokens]).float()
