"""How far each packed CPU format (`quantization="int8" | "int4"`) moves a real model's logits from fp32.

For the AR base (`smollm2-135m`: next-token logits at every position of each prompt) and the DLM
(`smollm2-135m-dlm`: `denoise_logits` of each prompt with its second half masked), against the same model in fp32:
relative logit error ||l - l_fp32|| / ||l_fp32||, top-1 agreement and mean KL(fp32 || format) over the positions.
A DLM's LoRA stays unmerged on a packed base (the base packed, the LoRA fp32 on top): merging it first would move
the weights off the grid of the base's GGUF and round them again.

    python -m bench.packed_quality --n 8
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

FALLBACK_PROMPTS = [
    "The old fisherman walked down to the sea every morning before sunrise, and",
    "It was the best of times, it was the worst of times, it was the age of wisdom,",
    "She opened the letter slowly, afraid of what it might say about her brother",
    "In the spring of that year the village council decided to build a new bridge",
]


def _logits(model, ids: torch.Tensor, dlm_mode: bool) -> torch.Tensor:
    with torch.inference_mode():
        if dlm_mode:
            x = ids.clone()
            x[:, ids.shape[1] // 2:] = model.mask_token_id
            return model.denoise_logits(x)[0].double()
        return model.base(input_ids=ids).logits[0].double()


def compare(ref: list, out: list) -> dict:
    err = [((o - r).norm() / r.norm()).item() for r, o in zip(ref, out)]
    agree = torch.cat([(o.argmax(-1) == r.argmax(-1)).double() for r, o in zip(ref, out)]).mean().item()
    kl = torch.cat([(r.log_softmax(-1).exp() * (r.log_softmax(-1) - o.log_softmax(-1))).sum(-1)
                    for r, o in zip(ref, out)]).mean().item()
    return {"logit_rel_err": sum(err) / len(err), "top1_agree": agree, "kl": kl}


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.packed_quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", type=int, default=8, help="held-out prompts (bench.continuation's set; 4 built-in ones "
                   "without ../shared/data)")
    p.add_argument("--models", default="smollm2-135m,smollm2-135m-dlm")
    p.add_argument("--formats", default="int8,int4")
    args = p.parse_args(argv)
    import dlm
    try:
        from bench.continuation import load_prompts
        from evals.data import default_data_dir
        prompts = load_prompts(default_data_dir(), args.n)
    except Exception:  # noqa: BLE001 - no data folder: the built-in prompts
        prompts = FALLBACK_PROMPTS[:args.n]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        ref_model = dlm.load(name, device="cpu", quantization=None)
        dlm_mode = ref_model.config.adapted
        ids = [ref_model.tokenizer(t, return_tensors="pt").input_ids[:, :48] for t in prompts]
        ref = [_logits(ref_model, i, dlm_mode) for i in ids]
        for fmt in args.formats.split(","):
            model = dlm.load(name, device="cpu", quantization=fmt)
            label = fmt + (" (LoRA unmerged)" if dlm_mode else "")
            rows.append({"model": name, "format": label, **compare(ref, [_logits(model, i, dlm_mode) for i in ids])})
            del model
    print(f"# logits vs fp32, {len(prompts)} prompts (<= 48 tokens; the DLM's second half masked)")
    print("| model | format | logit rel. error | top-1 agreement | KL(fp32 || format) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['logit_rel_err']:.2e} | {r['top1_agree']:.3f} | {r['kl']:.2e} |")
    return rows


if __name__ == "__main__":
    main()
