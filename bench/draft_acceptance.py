"""How often would the verifier accept a model's drafts? Teacher-forced tokens per forward on held-out text.

For each block length B, every block of held-out Gutenberg text (the books DiffuSmol's training holds out) is
masked whole and drafted in one staircase forward beside its clean copy; the clean rows are the verifier (the AR
base with a row-gated draft adapter, else the model's own causal rows). Per block, the speculative decoder would
write 1 + sum_j prod_{i<=j} alpha_j tokens per forward, alpha_j = sum_x min(p, q) for draft j at the temperature
(greedy: argmax q == argmax p). No decoding is run, so it is cheap and exactly comparable between checkpoints
(`dlm.draft_objectives.expected_tokens_per_forward`); `bench.continuation` measures the decoder itself.

    python -m bench.draft_acceptance --model smollm2-135m-dlm --blocks 2,4,8
    python -m bench.draft_acceptance --model runs/diffusmol-v3/final --blocks 4 --temperature 0.7
    python -m bench.draft_acceptance --jsonl runs/self-distill/smollm2-t0.7.jsonl   # the base's own text (its tail)

`--jsonl` measures on the last `--rows` documents of a JSONL corpus (`train.self_distill`'s: the base's own sampled
continuations, what the decoder meets), each document's last `--length` tokens; keep those documents out of training
(the training run's held-out tail, or documents written after its data was read).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.load_args import add_load_args, load_kwargs
from bench.output import write_json


def heldout_rows(model, data_dir: Path, n_rows: int, length: int) -> torch.Tensor:
    """[n_rows, length] token rows spread evenly through the held-out books."""
    from bench.continuation import HELDOUT_BOOKS
    from evals import data as D
    text = "\n\n".join(D.load_heldout_text(data_dir, b) for b in HELDOUT_BOOKS)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = max(length, (len(ids) - length) // n_rows)
    return torch.tensor([ids[i * stride: i * stride + length] for i in range(n_rows)])


def jsonl_rows(model, path: Path, n_rows: int, length: int, field: str = "text") -> torch.Tensor:
    """[n, length]: the last `length` tokens of each of the last `n_rows` documents at least that long."""
    import json
    rows = []
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        ids = model.tokenizer(json.loads(line)[field], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[-length:])
        if len(rows) == n_rows:
            break
    if not rows:
        raise SystemExit(f"--jsonl: no document of {path} has {length} tokens")
    return torch.tensor(rows[::-1])


@torch.no_grad()
def measure(model, rows: torch.Tensor, blocks: Sequence[int], temperature: float, batch: int = 8) -> list[dict]:
    from dlm.draft_objectives import expected_tokens_per_forward
    out = []
    for b in blocks:
        parts = [expected_tokens_per_forward(model, rows[i:i + batch].to(model.device), b, temperature)
                 for i in range(0, len(rows), batch)]
        n = sum(p["blocks"] for p in parts)
        def mean(key):
            return sum(p[key] * p["blocks"] for p in parts) / max(n, 1)
        out.append({"block_length": b, "blocks": n, "tpf": mean("tpf"), "tpf_greedy": mean("tpf_greedy"),
                    "alpha_first": mean("alpha")})
    return out


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.draft_acceptance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m-dlm")
    p.add_argument("--blocks", default="2,4,8", help="block lengths (comma-separated)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rows", type=int, default=32, help="held-out rows")
    p.add_argument("--length", type=int, default=128, help="tokens per row")
    p.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    p.add_argument("--jsonl", type=Path, default=None, help="measure on the last --rows documents of this JSONL")
    add_load_args(p, device="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import dlm
    from evals.data import default_data_dir
    model = dlm.load(args.model, **load_kwargs(args))
    if not model.clean_causal:
        p.error(f"{args.model}: no token-causal clean rows, so no speculative decoding to measure")
    rows = jsonl_rows(model, args.jsonl, args.rows, args.length) if args.jsonl else \
        heldout_rows(model, args.data_dir or default_data_dir(), args.rows, args.length)
    verifier = "the AR base (row-gated draft adapter)" if model.routing is not None else "the model's own clean rows"
    result = measure(model, rows, [int(b) for b in args.blocks.split(",")], args.temperature)
    text = f"the last documents of {args.jsonl}" if args.jsonl else "held-out books"
    print(f"# {args.model}: {len(rows)} rows x {args.length} tokens of {text}, verifier {verifier}")
    print(f"| block | blocks | tokens/forward T={args.temperature:g} | greedy | first draft accepted |")
    print("|---|---|---|---|---|")
    for r in result:
        print(f"| {r['block_length']} | {r['blocks']} | {r['tpf']:.3f} | {r['tpf_greedy']:.3f} | "
              f"{r['alpha_first']:.3f} |")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
