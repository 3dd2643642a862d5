"""Package a LoRA training export as a small offline asset (what `assets/smollm2-135m-dlm` is made with).

    python -m train.ship runs/diffusmol-v2/final assets/smollm2-135m-dlm [--dtype bfloat16] [--max-mb 40] \
        [--generate decoder=speculative --generate block_length=4 ...] [--infill FIELD=VALUE ...]
    python -m train.ship --draft runs/diffusmol-v3/final assets/smollm2-135m-dlm     (a draft adapter beside it)

Keeps only what differs from the base model: the peft adapter (LoRA matrices + the trained [MASK] row), cast to
`--dtype` (bf16 halves the size; `dlm.load` casts it back to the base dtype when it merges), the tokenizer (it
carries the added `<|mask|>` token) and `dlm_config.json` (which names `base_model`). An existing model card
(`README.md`) in the destination is kept. The destination is replaced atomically (temp dir + rename).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from dlm.fileio import atomic_directory

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FROZEN_COPY = ".token_adapter.base_layer.weight"
COPIED = ("adapter_config.json", "dlm_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "sampler_config.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def ship(export_dir: Path, dest: Path, dtype: str = "bfloat16", max_mb: float = 40.0,
         generate: Optional[dict] = None, infill: Optional[dict] = None) -> int:
    """Write the asset; returns its size in bytes. Raises ValueError for a non-adapter export or an oversize one.

    generate / infill: the model's recommended SamplerConfig fields for writing / for infilling, written as its
    `sampler_config.json` (validated first). Without them the asset keeps the recommendation it already ships,
    else the export's."""
    from dlm import SamplerConfig
    from dlm.sampler_config import load_sampler_configs, save_sampler_configs
    old_generate, old_infill = load_sampler_configs(export_dir)
    recommended = None
    if generate is not None or infill is not None:
        recommended = (SamplerConfig.from_dict(generate) if generate is not None else old_generate or SamplerConfig(),
                       SamplerConfig.from_dict(infill) if infill is not None else old_infill or SamplerConfig())
    from safetensors.torch import load_file, save_file
    export_dir, dest = Path(export_dir), Path(dest)
    if not (export_dir / ADAPTER_WEIGHTS).is_file() or not (export_dir / "dlm_config.json").is_file():
        raise ValueError(f"{export_dir} is not a LoRA export (needs {ADAPTER_WEIGHTS} and dlm_config.json); "
                         "train with lora.enabled=true")
    tensors = load_file(str(export_dir / ADAPTER_WEIGHTS))
    # peft saves the whole (frozen) embedding / tied head next to a trainable-token delta when the vocabulary was
    # resized for the added [MASK] token; `dlm.load` rebuilds that resized matrix from the base deterministically
    # (mean-initialised mask row), so only the delta ships.
    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()
               if not k.endswith(FROZEN_COPY)}
    with atomic_directory(dest) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_WEIGHTS).chmod(0o644)
        for name in COPIED:
            src = export_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        if recommended is not None:
            save_sampler_configs(tmp, *recommended)
        elif (dest / "sampler_config.json").is_file():  # a reviewed recommendation beats the export's default
            shutil.copy2(dest / "sampler_config.json", tmp / "sampler_config.json")
        if (dest / "README.md").is_file():  # keep the hand-written model card (not peft's generated one)
            shutil.copy2(dest / "README.md", tmp / "README.md")
        base = json.loads((export_dir / "dlm_config.json").read_text()).get("base_model")
        if base and (tmp / "adapter_config.json").is_file():  # name the base, not a path on the training machine
            cfg = json.loads((tmp / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = base
            (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > max_mb * 2**20:  # raising here leaves the shipped asset as it was
            raise ValueError(f"asset would be {size / 2**20:.1f} MB > --max-mb {max_mb}: lower lora.r or use bf16")
    return size


def ship_draft(export_dir: Path, dest: Path, dtype: str = "bfloat16", max_mb: float = 40.0,
               generate: Optional[dict] = None, name: str = "draft") -> int:
    """Put a row-gated draft adapter export (`lora.row_gate`) beside the asset's own adapter, as `dest/name`, and
    name it in the asset's dlm_config.json (`draft_adapter`): `dlm.load(dest)` then writes with the draft adapter
    verified by the base model and keeps the asset's adapter for full attention. Returns the draft's size."""
    export_dir, dest = Path(export_dir), Path(dest)
    saved = json.loads((export_dir / "dlm_config.json").read_text()) if (export_dir / "dlm_config.json").is_file() \
        else {}
    if not saved.get("row_gated"):
        raise ValueError(f"{export_dir} is not a row-gated draft adapter export (train with lora.row_gate=true)")
    if not (dest / "adapter_config.json").is_file() or not (dest / "dlm_config.json").is_file():
        raise ValueError(f"{dest} is not an adapter asset to put a draft adapter beside")
    with atomic_directory(dest) as tmp:
        for item in dest.iterdir():
            if item.name != name:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        size = ship(export_dir, tmp / name, dtype, max_mb)
        for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "sampler_config.json", "README.md"):
            (tmp / name / extra).unlink(missing_ok=True)   # the asset's own serve the model
        cfg = json.loads((tmp / "dlm_config.json").read_text())
        cfg["draft_adapter"] = name
        cfg["draft_training"] = saved.get("training", {})
        (tmp / "dlm_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if generate is not None:
            from dlm import SamplerConfig
            from dlm.sampler_config import load_sampler_configs, save_sampler_configs
            _, infill = load_sampler_configs(tmp)
            save_sampler_configs(tmp, SamplerConfig.from_dict(generate), infill or SamplerConfig())
    return size


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ship", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", type=Path, help="OUTPUT_DIR/final of a LoRA run")
    p.add_argument("dest", type=Path, help="asset directory, e.g. assets/smollm2-135m-dlm")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--max-mb", type=float, default=40.0)
    p.add_argument("--generate", action="append", default=[], metavar="FIELD=VALUE",
                   help="recommended SamplerConfig for writing (repeatable), e.g. --generate decoder=speculative")
    p.add_argument("--infill", action="append", default=[], metavar="FIELD=VALUE",
                   help="recommended SamplerConfig for infilling (repeatable)")
    p.add_argument("--draft", action="store_true",
                   help="the export is a row-gated draft adapter: put it beside DEST's adapter (DEST/draft)")
    a = p.parse_args(argv)
    try:
        def pairs(items):
            return dict(i.split("=", 1) for i in items) if items else None
        if any("=" not in i for i in a.generate + a.infill):
            raise ValueError("--generate / --infill take FIELD=VALUE")
        if a.draft:
            if a.infill:
                raise ValueError("--infill: a draft adapter does not infill (the asset's own adapter does)")
            size = ship_draft(a.export_dir, a.dest, a.dtype, a.max_mb, pairs(a.generate))
        else:
            size = ship(a.export_dir, a.dest, a.dtype, a.max_mb, pairs(a.generate), pairs(a.infill))
    except (ValueError, OSError) as e:  # SamplerConfigError is a ValueError: it names the field
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.dest}: {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
