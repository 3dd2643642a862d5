"""How soon does the playground animate? Time from asking for a generation to its first animated frame, as a user
of the Denoise tab waits for it (tokenizing, the worker start, the first forward), for the default model.

    python -m bench.first_frame                 # 64 tokens, the model's recommended writing config, 5 repeats
    python -m bench.first_frame --model PATH --length 64 --repeats 5

Target (playground issue): < 1 s for 64 tokens on the default model. The rest of each run is cancelled.
Plots are drawn only once a run has ended (app/tabs/common.py), so they never delay the token stream.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Optional, Sequence

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    p = argparse.ArgumentParser(prog="bench.first_frame", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the playground's default DLM")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from app.backend import Backend
    backend = Backend()
    backend.load_default(args.model, device=args.device)
    backend.time_to_first_frame(PROMPT, max_new_tokens=args.length)  # warm-up
    times = [backend.time_to_first_frame(PROMPT, max_new_tokens=args.length) for _ in range(args.repeats)]
    cfg = backend.base_config("write")
    print(f"# {backend.info.name}, {cfg.decoder} decoder, {args.length} tokens: first frame after "
          f"{statistics.median(times):.3f} s (median of {len(times)}; min {min(times):.3f}, max {max(times):.3f}); "
          f"target < 1 s: {'yes' if statistics.median(times) < 1.0 else 'NO'}")
    return times


if __name__ == "__main__":
    main()
