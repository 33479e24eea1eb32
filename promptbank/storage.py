"""On-disk bank format: a folder of JSON + safetensors, written atomically. Never pickle.

```
my_bank/
  promptbank.json              manifest: format + version, written_by, backbone fingerprint, embedder, task records
  index.faiss                  derived routing index; rebuilt from the keys unless trust_index=True
  tasks/<name>/
    prompt.safetensors         the soft prompt: "layer.<l>" -> (P, d) fp32 (canonical)
    keys.safetensors           "keys" -> (k, d_embed) routing prototypes
    train_state.safetensors    prompt-module state (P-Tuning encoder included), to resume training
    adapter_config.json        PEFT export: PROMPT_TUNING (input-level prompts) or PREFIX_TUNING (deep prompts,
    adapter_model.safetensors    the per-layer key/value cache) -> PeftModel.from_pretrained works
```
A save writes a complete new folder next to the target and swaps it in with renames, so a crash leaves either the
old or the new bank; saving into the folder a bank was loaded from works because everything is in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from .backbone import Backbone, check_fingerprint, load_backbone
from .embed import Embedder, load_embedder
from .errors import BankFormatError

if TYPE_CHECKING:
    from .bank import PromptBank

logger = logging.getLogger(__name__)

FORMAT = "promptbank"
FORMAT_VERSION = 1
MANIFEST = "promptbank.json"
INDEX_FILE = "index.faiss"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "promptbank": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def peft_export(backbone: Backbone, prompt: dict[int, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT adapter config + tensors for a soft prompt.

    Input-level prompts become PROMPT_TUNING (``prompt_embeddings`` (P, d)). Deep prompts become PREFIX_TUNING
    holding the prompt's exact per-layer key/value cache (keys after RoPE at positions 0..P-1), laid out as
    PEFT expects: (P, layers * 2 * kv_heads * head_dim).
    """
    cfg = backbone.model.config
    p, d = prompt[0].shape
    common = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(p),
        "num_layers": int(cfg.num_hidden_layers),
        "inference_mode": True,
        "base_model_name_or_path": backbone.name,
        "revision": None,
        "num_transformer_submodules": 1,
    }
    if list(prompt) == [0]:
        config = dict(
            common,
            peft_type="PROMPT_TUNING",
            token_dim=int(d),
            num_attention_heads=int(cfg.num_attention_heads),
            prompt_tuning_init="RANDOM",
        )
        return config, {"prompt_embeddings": prompt[0].float().contiguous()}
    from .inject import prompt_kv

    with torch.no_grad():
        kv = prompt_kv(backbone.model, prompt)
    kv_heads, head_dim = kv[0][0].shape[1], kv[0][0].shape[3]
    per_layer = [torch.stack([k[0], v[0]]) for k, v in kv]  # each (2, H_kv, P, hd)
    stacked = torch.stack(per_layer)  # (L, 2, H_kv, P, hd)
    flat = stacked.permute(3, 0, 1, 2, 4).reshape(p, -1)  # (P, L * 2 * H_kv * hd)
    config = dict(
        common,
        peft_type="PREFIX_TUNING",
        token_dim=int(kv_heads * head_dim),
        num_attention_heads=int(kv_heads),
        prefix_projection=False,
        encoder_hidden_size=int(d),
    )
    return config, {"prompt_embeddings": flat.float().contiguous()}


def save_bank(bank: PromptBank, path: str | os.PathLike) -> None:
    """Write ``bank`` to folder ``path`` atomically (temp folder + rename)."""
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise BankFormatError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise BankFormatError(f"refusing to overwrite {target}: it is a non-empty folder that is not a bank")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_folder(bank, tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_folder(bank: PromptBank, folder: Path) -> None:
    tasks_dir = folder / "tasks"
    tasks_dir.mkdir()
    for name, task in bank._tasks.items():
        tdir = tasks_dir / name
        tdir.mkdir()
        meta = {"format": "promptbank-soft-prompt"}  # one key: safetensors does not keep metadata order
        save_file(
            {f"layer.{layer}": t.contiguous() for layer, t in sorted(task.prompt.items())},
            str(tdir / "prompt.safetensors"),
            metadata=meta,
        )
        save_np(
            {
                "keys": np.ascontiguousarray(task.keys, dtype=np.float32),
                "ids": np.ascontiguousarray(bank.router.ids(name), dtype=np.int64),
            },
            str(tdir / "keys.safetensors"),
        )
        if task.train_state:
            save_file({k: v.contiguous() for k, v in task.train_state.items()}, str(tdir / "train_state.safetensors"))
        if task.head is not None:
            save_file({k: v.contiguous() for k, v in task.head.items()}, str(tdir / "head.safetensors"))
        if bank.backbone.kind == "causal_lm":  # PEFT's prompt methods are for decoders; encoders keep our format
            peft_cfg, peft_tensors = peft_export(bank.backbone, task.prompt)
            _write_json(tdir / "adapter_config.json", peft_cfg)
            save_file(peft_tensors, str(tdir / "adapter_model.safetensors"))
    index_bytes = bank.router.index_bytes()
    (folder / INDEX_FILE).write_bytes(index_bytes)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": _versions(),
        "backbone": {"name": bank.backbone.name, "kind": bank.backbone.kind, "fingerprint": bank.backbone.fingerprint},
        "embedder": {"name": bank.embedder.name, "dim": int(bank.embedder.dim)},
        "index": {
            "file": INDEX_FILE,
            "type": "IndexIDMap2(IndexFlatIP)",
            "top_keys": int(bank.router.top_keys),
            "ntotal": int(bank.router.ntotal),
            "next_id": int(bank.router.next_id),
        },
        "tasks": {name: t.record.to_dict() for name, t in bank._tasks.items()},
        "task_order": list(bank._tasks),
    }
    _write_json(folder / MANIFEST, manifest)
    _make_readable(folder)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and safetensors writes 0600 files; give the bank ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _swap_in(tmp: Path, target: Path) -> None:
    _fsync_tree(tmp)
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(target, old)  # the old bank stays complete under `old` until the new one is in place
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise BankFormatError(f"{folder} is not a promptbank bank (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankFormatError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BankFormatError(f"{mpath}: not a promptbank manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BankFormatError(
            f"{mpath}: format version {version!r} is newer than this promptbank supports "
            f"({FORMAT_VERSION}); upgrade promptbank"
        )
    return manifest


def load_bank(
    cls,
    path: str | os.PathLike,
    *,
    backbone: str | os.PathLike | Backbone | None = None,
    embedder: str | Embedder | None = None,
    allow_mismatch: bool = False,
    trust_index: bool = False,
) -> PromptBank:
    """Load a bank folder. Tensors are copied out of the files; the index is rebuilt from keys unless
    ``trust_index`` (and then only if it agrees with the keys)."""
    from .bank import TaskRecord, _Task, validate_task_name
    from .router import Router

    folder = Path(path)
    manifest = read_manifest(folder)
    bb_info = manifest["backbone"]
    if backbone is None:
        backbone = bb_info["name"]
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, kind=bb_info.get("kind", "causal_lm"))
    check_fingerprint(bb_info["fingerprint"], bb.fingerprint, allow_mismatch=allow_mismatch)
    emb = load_embedder(embedder if embedder is not None else manifest["embedder"]["name"])
    if emb.dim != manifest["embedder"]["dim"]:
        raise BankFormatError(
            f"{folder}: bank keys have dim {manifest['embedder']['dim']}, embedder {emb.name!r} gives {emb.dim}"
        )
    bank = cls(bb, emb)
    d = bb.hidden_size
    tasks: dict[str, _Task] = {}
    ids: dict[str, np.ndarray] = {}
    for name in manifest.get("task_order", list(manifest["tasks"])):
        validate_task_name(name)
        record = TaskRecord.from_dict(manifest["tasks"][name])
        tdir = folder / "tasks" / name
        try:
            raw = load_file(str(tdir / "prompt.safetensors"))
            key_file = load_np(str(tdir / "keys.safetensors"))
            keys, ids[name] = key_file["keys"], key_file["ids"]
            state_path = tdir / "train_state.safetensors"
            train_state = {k: v.clone() for k, v in load_file(str(state_path)).items()} if state_path.exists() else {}
            head_path = tdir / "head.safetensors"
            head = {k: v.clone() for k, v in load_file(str(head_path)).items()} if head_path.exists() else None
        except (OSError, KeyError, SafetensorError) as e:
            raise BankFormatError(f"{tdir}: cannot read task files ({type(e).__name__}: {e})") from None
        prompt = {}
        for key, t in raw.items():
            if not key.startswith("layer."):
                raise BankFormatError(f"{tdir / 'prompt.safetensors'}: unexpected tensor {key!r}")
            layer = int(key.split(".", 1)[1])
            if t.dim() != 2 or t.shape[1] != d or not torch.isfinite(t).all():
                raise BankFormatError(
                    f"{tdir / 'prompt.safetensors'}: tensor {key!r} has shape {tuple(t.shape)} or "
                    f"non-finite values; expected (P, {d}) finite"
                )
            prompt[layer] = t.clone()
        if bb.kind == "encoder" and (
            head is None
            or set(head) != {"weight", "bias"}
            or tuple(head["weight"].shape) != (len(record.labels or []), d)
        ):
            raise BankFormatError(f"{tdir}: missing or malformed head.safetensors for an encoder task")
        tasks[name] = _Task(record, prompt, np.array(keys, dtype=np.float32, copy=True), train_state, head)
    index_path = folder / INDEX_FILE
    try:
        bank.router = Router.from_keys(
            {n: t.keys for n, t in tasks.items()},
            {n: t.record.threshold for n, t in tasks.items()},
            dim=emb.dim,
            top_keys=int(manifest["index"].get("top_keys", 1)),
            ids=ids,
            next_id=manifest["index"].get("next_id"),
            index_bytes=index_path.read_bytes() if trust_index and index_path.exists() else None,
        )
    except ValueError as e:
        raise BankFormatError(f"{folder}: inconsistent routing keys ({e})") from None
    bank._tasks = tasks
    return bank
