"""llama.cpp's row: the AR model a CPU user would otherwise run, on the very GGUF the default model is built on.

Held-out prompts (`bench.continuation`'s set), `--new-tokens` each, T / top-p as the DLM's benchmarks, `--threads`
threads, wall clock with the prompt included: tokens/s, and the decode-only ms per token llama.cpp reports. Needs
`llama_cpp` (llama-cpp-python, an optional bench extra that builds llama.cpp from source: ~15 min on 2 cores; never
part of `make test`); without it this prints why and returns None.

    pip install llama-cpp-python        # once, optional
    python -m bench.llama_cpp_row --threads 2 --n 4 --new-tokens 128
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence


def gguf_path(model: str = "smollm2-135m") -> Path:
    from dlm import model_registry
    return model_registry.get(model).local_path()


def run(prompts: Sequence[str], gguf: Path, threads: int, new_tokens: int, temperature: float, top_p: float,
        seed: int = 0) -> Optional[dict]:
    """tokens/s of llama.cpp on `prompts`, or None (with a message) when llama_cpp is not importable."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp row skipped: llama_cpp is not importable (pip install llama-cpp-python: builds llama.cpp "
              "from source, ~15 min on 2 cores)")
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, seed=seed,
                verbose=False)
    tokens, texts = 0, []
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        out = llm.create_completion(prompt, max_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                                    seed=seed + i)
        tokens += out["usage"]["completion_tokens"]
        texts.append(out["choices"][0]["text"])
    seconds = time.perf_counter() - t0
    return {"what": f"llama.cpp ({gguf.name}), AR", "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "threads": threads, "texts": texts}


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llama_cpp_row", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="a registry entry whose source is a GGUF")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    args = p.parse_args(argv)
    from bench.continuation import load_prompts
    from evals.data import default_data_dir
    prompts = load_prompts(args.data_dir or default_data_dir(), args.n)
    result = run(prompts, gguf_path(args.model), args.threads, args.new_tokens, args.temperature, args.top_p)
    if result is not None:
        print(f"| {result['what']} | {result['tokens_per_s']:.1f} tokens/s | {result['tokens']} tokens in "
              f"{result['seconds']:.1f} s, {result['threads']} threads |")
    return result


if __name__ == "__main__":
    main()
