"""Diffusion SFT data: (prompt, response) pairs on a fixed-length canvas where only the response is ever noised.

Each record (a JSONL line, e.g. GSM8K's {question, answer}) becomes
    [prompt tokens][response tokens][EOS][padding ...]            (length = sft.max_length)
with `maskable` = the response region, and the padding treated per `sft.padding`:
    pad    DiffuSeq: padding ids are targets too (noised and predicted), so the model learns where an answer ends
           and generation can run on a fixed-length canvas;
    eos    the same with EOS as the padding id (LLaDA);
    ignore padding is neither attended to nor predicted.
The prompt is never in `maskable`, so `q_sample` can never put a [MASK] there (tested).
Tokenized records are cached like pre-training tokens (`<cache>/sft/<key>/`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlm.fileio import atomic_directory, cache_dir

from .data import DataError, _file_stamp, expand_sources, iter_jsonl, tokenizer_fingerprint

log = logging.getLogger(__name__)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def read_records(files: list[str], fields: list[str]) -> list[dict]:
    """JSONL files -> records, each checked for the fields the templates use (errors name file:line)."""
    records = []
    for path in files:
        for lineno, record in iter_jsonl(path):
            missing = [k for k in fields if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataError(f"{path}:{lineno}: record has no field(s) {', '.join(missing)} used by the "
                                "sft templates (set sft.prompt_template / sft.response_template)")
            records.append(record)
    if not records:
        raise DataError(f"no records in {', '.join(files)}")
    return records


def format_record(record: dict, record_format: str) -> dict:
    """The record as the templates see it (`sft.record_format`)."""
    if record_format == "gsm8k_symbolic":
        from dlm.formats import gsm8k_symbolic
        return {**record, "answer": gsm8k_symbolic(record["answer"])}
    return record


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, chat_template: bool) -> tuple[list, list]:
    """-> (prompt ids, response ids + EOS), truncated to fit `max_length` (prompt from the left, at most half the
    canvas when the response needs the room; response from the right)."""
    if chat_template:
        p = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
        p = list(p["input_ids"] if isinstance(p, dict) else p)
    else:
        p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [int(tokenizer.eos_token_id)]
    if len(p) + len(r) > max_length:
        keep_p = max(1, min(len(p), max(max_length // 2, max_length - len(r))))
        p = p[-keep_p:]
        r = r[: max_length - len(p)]
    return p, r


@dataclass
class SFTArrays:
    ids: np.ndarray         # [N, L] int32 canvas (prompt, response, EOS, padding)
    prompt_len: np.ndarray  # [N] int32
    content_len: np.ndarray  # [N] int32: prompt + response + EOS
    directory: Path
    built: bool


def _pad_id(sft_cfg, tokenizer) -> int:
    if sft_cfg.padding == "eos":
        return int(tokenizer.eos_token_id)
    if sft_cfg.pad_token_id is not None:
        return int(sft_cfg.pad_token_id)
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


def build_sft_cache(data_cfg, sft_cfg, tokenizer) -> SFTArrays:
    """Tokenize the SFT records once (or reuse the cache) into fixed-length canvases."""
    files = expand_sources(list(data_cfg.sources))
    if any(f.startswith("hf:") for f in files):
        raise DataError("SFT reads local JSONL files; export the Hugging Face dataset to JSONL first")
    fields = template_fields(sft_cfg.prompt_template) + template_fields(sft_cfg.response_template)
    settings = {"files": [_file_stamp(f) for f in files], "tok": tokenizer_fingerprint(tokenizer),
                "sft": [sft_cfg.prompt_template, sft_cfg.response_template, sft_cfg.chat_template,
                        sft_cfg.max_length, sft_cfg.padding, _pad_id(sft_cfg, tokenizer), sft_cfg.record_format],
                "max_documents": data_cfg.max_documents, "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    root = (Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else cache_dir() / "tokens") / "sft"
    directory = root / key
    if (directory / "meta.json").is_file():
        try:
            arrays = _load(directory, built=False)
            log.info("reusing SFT cache %s (%d records)", directory, len(arrays.ids))
            return arrays
        except (OSError, ValueError):
            pass
    records = read_records(files, fields)
    if data_cfg.max_documents:
        records = records[: data_cfg.max_documents]
    L, pad = sft_cfg.max_length, _pad_id(sft_cfg, tokenizer)
    ids = np.full((len(records), L), pad, dtype=np.int32)
    prompt_len = np.zeros(len(records), dtype=np.int32)
    content_len = np.zeros(len(records), dtype=np.int32)
    for i, rec in enumerate(records):
        rec = format_record(rec, sft_cfg.record_format)
        try:
            prompt = sft_cfg.prompt_template.format(**rec)
            response = sft_cfg.response_template.format(**rec)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"record {i}: template error {e!r}") from None
        p, r = encode_pair(tokenizer, prompt, response, L, sft_cfg.chat_template)
        ids[i, : len(p)] = p
        ids[i, len(p): len(p) + len(r)] = r
        prompt_len[i], content_len[i] = len(p), len(p) + len(r)
    with atomic_directory(directory, keep_existing=True) as tmp:  # another rank may finish the same cache first
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "prompt_len.npy", prompt_len)
        np.save(tmp / "content_len.npy", content_len)
        (tmp / "meta.json").write_text(json.dumps({"n": len(records), "max_length": L, "pad_id": pad,
                                                   "files": files}, indent=1))
    truncated = int((content_len >= L).sum())
    log.info("SFT: %d records -> %s (%d filled the whole canvas of %d)", len(records), directory, truncated, L)
    return _load(directory, built=True)


def _load(directory: Path, built: bool) -> SFTArrays:
    return SFTArrays(np.load(directory / "ids.npy", mmap_mode="r"), np.load(directory / "prompt_len.npy"),
                     np.load(directory / "content_len.npy"), directory, built)


def sft_batch(ids: torch.Tensor, prompt_len: torch.Tensor, content_len: torch.Tensor, padding: str) -> dict:
    """Canvases -> loss inputs.

    ids [B, L], prompt_len [B], content_len [B] ->
      input_ids [B, L];
      maskable [B, L] bool: positions >= prompt_len, and < content_len unless padding is a target;
      attention_mask [B, L] (only for padding="ignore": 0 on padding) or None.
    With padding="ignore" the canvases are cut after the batch's longest content: padding that is neither
    attended to nor a target changes no loss, only the cost (GSM8K: ~100 of 256 positions hold content).
    """
    if padding == "ignore":
        ids = ids[:, : int(content_len.max())]
    L = ids.shape[1]
    pos = torch.arange(L)[None, :]                       # [1, L]
    maskable = pos >= prompt_len[:, None]                 # the prompt is never noised
    attention_mask = None
    if padding == "ignore":
        real = pos < content_len[:, None]
        maskable &= real
        attention_mask = real.long()
    return {"input_ids": ids.long(), "maskable": maskable, "attention_mask": attention_mask}


class SFTData:
    """Indexable SFT canvases (train or held-out part) with the same `.batch(indices)` as `PackedBlocks`."""

    def __init__(self, arrays: SFTArrays, indices: np.ndarray, padding: str, name: str = "train"):
        self.arrays, self.indices, self.padding = arrays, indices, padding
        if len(indices) == 0:
            raise DataError(f"the SFT {name} split is empty (more records, or change data.eval_fraction)")

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices) -> dict:
        rows = self.indices[np.asarray(indices)]
        ids = torch.from_numpy(np.asarray(self.arrays.ids[rows], dtype=np.int64))
        return sft_batch(ids, torch.from_numpy(self.arrays.prompt_len[rows].astype(np.int64)),
                         torch.from_numpy(self.arrays.content_len[rows].astype(np.int64)), self.padding)


def split_sft(arrays: SFTArrays, eval_fraction: float, seed: int, padding: str) -> tuple[SFTData, SFTData | None]:
    """Seeded record shuffle; the last `eval_fraction` of records are held out."""
    n = len(arrays.ids)
    order = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction)) if eval_fraction > 0 else 0
    n_eval = min(n_eval, n - 1)
    train = SFTData(arrays, np.sort(order[: n - n_eval]), padding, "train")
    held = SFTData(arrays, np.sort(order[n - n_eval:]), padding, "eval") if n_eval > 0 else None
    return train, held

