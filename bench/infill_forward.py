"""What one forward of the Infill tab costs, against the plain forwards of the same length: where the time goes.

The Infill tab's own example (app/tabs/infill.py: two spans, 14 masked tokens, a ~40-token canvas) is filled with
the model's infilling config (full attention, one token per step); per forward, in ms (median over --repeats):

  infill step        the full decoder's forward as the app runs it (`model.fill`: nfe / model seconds)
  in the app         the same through the playground's Backend (its worker, per-layer cancellation hooks)
  plain causal       `model.base(ids)` over a canvas of the same length (the AR model's prompt forward)
  plain bidir.       the same with full attention (`model.denoise_logits`: what every step computes)
  bidir. no head     its transformer body only (no logits: the share of the 49k-vocabulary output layer)
  1-token cached     one new token over a cached prefix of the same length (what an AR step costs)

    python -m bench.infill_forward                 # the shipped default on CPU, one thread
    python -m bench.infill_forward --threads 2     # (on a CPU shared with other work: far slower, see docs/app.md)
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import torch

from bench.load_args import add_load_args, load_kwargs
from dlm.attention import bidirectional
from dlm.kv_cache import truncate_cache


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.infill_forward", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m-dlm")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the app's worker thread runs "
                   "with one; on a shared CPU more threads can be 10x slower, not faster)")
    add_load_args(p, device="cpu")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    import dlm
    from app.tabs.infill import TEMPLATE
    from dlm.infill import template_canvas
    model = dlm.load(args.model, **load_kwargs(args))
    cfg = model.infill_config or dlm.SamplerConfig()
    rows = {}

    fills = []
    for _ in range(max(1, args.repeats // 2)):
        g = model.fill(TEMPLATE, cfg)
        fills.append(1000 * g.seconds / g.nfe)
    n_forwards = g.nfe
    rows["infill step"] = statistics.median(fills)

    from app.backend import Backend
    kwargs = load_kwargs(args)
    backend = Backend(time_limit=None, attn_implementation=kwargs.pop("attn_implementation"))
    backend.load(args.model, **kwargs)
    app_ms = []
    for _ in range(max(1, args.repeats // 2)):
        g = backend.infill(backend.sampler(task="infill"), template=TEMPLATE).wait().result()
        app_ms.append(1000 * g.seconds / g.nfe)
    rows["in the app"] = statistics.median(app_ms)
    backend.free()

    canvas = template_canvas(model, TEMPLATE)
    ids = torch.tensor([[t if f else model.mask_token_id for t, f in zip(canvas.input_ids, canvas.fixed)]],
                       device=model.device)
    L = ids.shape[1]
    with torch.inference_mode():
        rows["plain causal"] = median_ms(lambda: model.base(input_ids=ids), args.repeats)
        rows["plain bidir."] = median_ms(lambda: model.denoise_logits(ids), args.repeats)
        body = model.base.get_decoder() if hasattr(model.base, "get_decoder") else model.base.model
        with bidirectional(model.base.config):
            rows["bidir. no head"] = median_ms(lambda: body(input_ids=ids), args.repeats)
        out = model.base(input_ids=ids[:, :-1], use_cache=True)
        past = out.past_key_values

        def one():
            model.base(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
            truncate_cache(past, L - 1)
        rows["1-token cached"] = median_ms(one, args.repeats)
    print(f"# {args.model}: the Infill tab's example, a {L}-token canvas, {n_forwards} forwards; "
          f"threads {torch.get_num_threads()}")
    print("| forward | ms |\n|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.0f} |")
    return rows


if __name__ == "__main__":
    main()
