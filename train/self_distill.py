"""Self-distillation data: the AR base's own continuations of prompts, for training a draft adapter.

A draft is accepted when it agrees with what the base itself would write, so the text it learns on should be the
base's own (Medusa-2 and EAGLE train their drafters on the target model's generations for this reason): books teach
the drafts to predict books, while the decoder meets the base's sampled continuations of a prompt. This writes a
JSONL corpus (one document per line, `text` = prompt + continuation) that `train` reads like any other source.

Prompts, fixed for a given seed and disjoint from what the benchmarks decode: openings of paragraphs from the
Gutenberg books the training run may read (the held-out books of `bench.continuation` excluded), and GSM8K *train*
questions in the model's chat template (the playground's chat use). The continuations are sampled from the base
(adapters off) with Hugging Face `generate` and its KV cache, `batch` prompts at a time.

Resumable: rerunning the same command appends to `--out` after the prompts it already holds.

    python -m train.self_distill --model smollm2-135m --out runs/self-distill/smollm2-t0.7.jsonl --n 1200
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from dlm.fileio import default_data_dir
from train.documents import HELDOUT_BOOKS, gutenberg_clean, iter_jsonl


def book_openings(data_dir: Path, seed: int) -> list[dict]:
    """Every usable paragraph opening (16-48 words) of the training books, in a fixed order for the seed: each book's
    paragraphs shuffled, the books taken in turn, so any first n spread over all of them."""
    books = [p for p in sorted((data_dir / "gutenberg").glob("*.txt.gz")) if p.name not in HELDOUT_BOOKS]
    random.Random(seed).shuffle(books)
    per_book = []
    for path in books:
        rng = random.Random(f"{seed}/{path.name}")
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            paras = [" ".join(p.split()) for p in gutenberg_clean(f.read()).split("\n\n")]
        paras = [p for p in paras if len(p.split()) >= 60]
        rng.shuffle(paras)
        per_book.append([{"source": f"gutenberg/{path.name}", "prompt": " ".join(p.split()[:rng.randint(16, 48)])}
                         for p in paras])
    return [book[i] for i in range(max(map(len, per_book), default=0)) for book in per_book if i < len(book)]


def chat_questions(data_dir: Path, seed: int) -> list[str]:
    """GSM8K train questions in a fixed order for the seed ([] without the file)."""
    path = data_dir / "gsm8k" / "train.jsonl"
    if not path.exists():
        return []
    rows = [row["question"] for _, row in iter_jsonl(str(path))]
    random.Random(seed).shuffle(rows)
    return rows


def prompts(data_dir: Path, tokenizer, n: int, chat_share: float, seed: int) -> list[dict]:
    """The first n prompts of a fixed sequence for the seed (so a larger n extends a smaller one): a chat question
    (the chat template's user turn, the assistant's turn opened) at every 1/chat_share-th place, book openings
    elsewhere; a source that runs out leaves its places to the other."""
    books = book_openings(data_dir, seed)
    chats = chat_questions(data_dir, seed) if getattr(tokenizer, "chat_template", None) else []
    out: list[dict] = []
    b = c = 0
    for i in range(n):
        chat_turn = int((i + 1) * chat_share) > int(i * chat_share)
        if (chat_turn or b >= len(books)) and c < len(chats):
            out.append({"source": "gsm8k/train", "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": chats[c]}], add_generation_prompt=True, tokenize=False)})
            c += 1
        elif b < len(books):
            out.append(books[b])
            b += 1
    return out


def _batches(items: list, size: int, start: int) -> Iterator[tuple[int, list]]:
    for i in range(start, len(items), size):
        yield i, items[i:i + size]


@torch.no_grad()
def continue_batch(model, texts: list[str], new_tokens: int, temperature: float, top_p: float, seed: int
                   ) -> list[str]:
    """Sample a continuation of each text from the base (adapters off), left-padded into one batch."""
    tok = model.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.eos_token_ids[0]
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    suppress = [model.mask_token_id] if getattr(model, "mask_token_id", None) is not None else None
    torch.manual_seed(seed)
    out = model.base.generate(input_ids=input_ids, attention_mask=attention, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_p=top_p,
                              max_new_tokens=new_tokens, pad_token_id=pad, suppress_tokens=suppress,
                              eos_token_id=list(model.eos_token_ids or []) or None)
    texts_out, eos = [], set(model.eos_token_ids or [])
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))   # keep the EOS: it is text too
        texts_out.append(tok.decode(row[:cut], skip_special_tokens=False))
    return texts_out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the AR base (registry name or path)")
    p.add_argument("--out", type=Path, required=True, help="JSONL to write (appended to when it exists)")
    p.add_argument("--data-dir", type=Path, default=None, help="default $DLM_DATA_DIR or ../shared/data")
    p.add_argument("--n", type=int, default=1200, help="prompts in all")
    p.add_argument("--chat-share", type=float, default=0.25, help="share of prompts that are chat questions")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    import dlm
    if args.threads:
        torch.set_num_threads(args.threads)
    model = dlm.load(args.model)
    items = prompts(args.data_dir or default_data_dir(), model.tokenizer, args.n, args.chat_share, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = sum(1 for _ in open(args.out, encoding="utf-8")) if args.out.exists() else 0
    t0, written = time.time(), 0
    with open(args.out, "a", encoding="utf-8") as f:
        for i, batch in _batches(items, args.batch, done):
            conts = continue_batch(model, [b["prompt"] for b in batch], args.new_tokens, args.temperature,
                                   args.top_p, seed=args.seed * 1_000_003 + i)
            for item, cont in zip(batch, conts):
                f.write(json.dumps({"text": item["prompt"] + cont, **item, "continuation": cont}) + "\n")
            f.flush()
            written += len(batch)
            print(f"[{i + len(batch)}/{len(items)}] {written / (time.time() - t0):.2f} prompts/s", flush=True)
    return args.out


if __name__ == "__main__":
    main()
