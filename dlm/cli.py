"""Command line: `python -m dlm generate|infill|fill|score|info|models ...`.

    python -m dlm generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 32
    python -m dlm infill   --model PATH --prefix "def add(a, b):" --suffix "    return c" --length 8
    python -m dlm fill     --model PATH --template "The [MASK:3] sat on the [MASK]." --json
    python -m dlm score    --model PATH --context "The cat sat on the" --continuation " mat" --method elbo
    python -m dlm info     --model smollm2-135m
    python -m dlm models

Flags mirror the Python arguments (`dlm.load`, `DiffusionLM.generate`, `dlm.likelihood.score`). `--json` prints
exactly one JSON object on stdout. A progress bar (tqdm, on stderr) appears only when stderr is a terminal.
Errors exit non-zero with one line on stderr (`dlm: error: ...`); `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

from .load_options import ATTN_IMPLEMENTATIONS, QUANTIZATIONS

PROG = "dlm"
SCORE_METHODS = ("elbo", "paper", "ar")


class CliError(Exception):
    """A user error detected by the CLI itself (bad flag combination, unreadable file)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (`dlm: error: ...`, exit 2) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{PROG}: error: {message} (see: {self.prog} --help)\n")


# ----- argument types ----------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _text(value: str) -> str:
    """`-` reads the text from stdin; `@path` reads it from a file; anything else is the text itself."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@") and len(value) > 1:
        try:
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {value[1:]!r}: {e.strerror}") from None
    return value


# ----- parser ------------------------------------------------------------------------------------------------------
def _common_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    g.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    g.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    return p


def _model_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model (dlm.load)")
    g.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="registry name (see `python -m dlm models`), local directory, .gguf file or hub id")
    g.add_argument("--mask-token-id", type=non_negative_int, default=None, help="override the [MASK] token id")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="auto (default: bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="auto (default): int4 on a CPU where it is exact (a Q4_1 GGUF base, the embedded default), "
                        "else none; none: full precision; int8 / int4: dlm's packed weight-only CPU formats; "
                        "8bit / 4bit: bitsandbytes (CPU or CUDA; on a CPU slower than fp32)")
    g.add_argument("--adapter", default=None, metavar="DIR", help="a peft LoRA adapter directory to apply")
    g.add_argument("--attn-implementation", default="auto", choices=ATTN_IMPLEMENTATIONS)
    return p


def _flag_type(f: dict):
    """argparse type for a SamplerConfig field: the config's own coercion, so the CLI's messages are its messages."""
    def convert(text: str):
        from .sampler_config import SamplerConfig, SamplerConfigError
        try:
            return getattr(SamplerConfig.from_dict({f["name"]: text}), f["name"])
        except SamplerConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = f["type"].__name__
    return convert


def _sampler_flags() -> argparse.ArgumentParser:
    """One flag per `SamplerConfig` field (generated: a new knob is a new flag with no CLI change). Unset flags keep
    the model's recommended config (its sampler_config.json); booleans are --x / --no-x."""
    from .sampler_config import SamplerConfig
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampler (dlm.SamplerConfig; default: the model's recommended config)")
    for f in SamplerConfig.describe():
        flag = "--" + f["name"].replace("_", "-")
        help_text = f"{f['help']} (library default {f['default']!r})"
        if f["type"] is bool:
            g.add_argument(flag, dest=f"cfg_{f['name']}", action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        else:
            g.add_argument(flag, dest=f"cfg_{f['name']}", type=_flag_type(f), default=None,
                           choices=f.get("choices") or None, metavar=None if f.get("choices") else
                           f["type"].__name__.upper(), help=help_text)
    g.add_argument("--frames", action="store_true", help="with --json: include every denoising frame")
    g.add_argument("--animation", default=None, metavar="PATH",
                   help="also write the denoising animation: an animated .gif or a self-contained .html replay")
    return p


def build_parser() -> argparse.ArgumentParser:
    common, model, sampler = _common_flags(), _model_flags(), _sampler_flags()
    parser = _Parser(prog=f"python -m {PROG}", description="Diffusion language models from causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("generate", parents=[common, model, sampler], help="generate text after a prompt")
    p.add_argument("--prompt", type=_text, required=True, help="prompt text ('-' = stdin, '@file' = a file)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--ar", action="store_true",
                   help="left-to-right baseline: the same weights run causally with Hugging Face generate")

    p = sub.add_parser("infill", parents=[common, model, sampler], help="generate tokens between prefix and suffix")
    p.add_argument("--prefix", type=_text, default="", help="text before the gap (may be empty)")
    p.add_argument("--suffix", type=_text, default="", help="text after the gap (may be empty)")
    p.add_argument("--length", type=positive_int, required=True, help="tokens to generate in the gap")

    p = sub.add_parser("fill", parents=[common, model, sampler], help="fill the [MASK] / [MASK:n] spans of a template")
    p.add_argument("--template", type=_text, required=True, help="text with [MASK] (1 token) / [MASK:n] spans")

    p = sub.add_parser("score", parents=[common, model], help="log-likelihood of a continuation given a context")
    p.add_argument("--context", type=_text, default="", help="conditioning text (never masked)")
    p.add_argument("--continuation", type=_text, required=True, help="the text scored (usually starts with a space)")
    p.add_argument("--method", choices=SCORE_METHODS, default="elbo",
                   help="elbo (Monte-Carlo ELBO, default), paper (DiffuLLaMA's grid), ar (exact causal score)")
    p.add_argument("--n-samples", type=positive_int, default=32,
                   help="Monte-Carlo samples (elbo) or noise levels T (paper); default 32")
    p.add_argument("--batch-size", type=positive_int, default=16, help="masked copies per forward (default 16)")
    p.add_argument("--seed", type=_flag_type({"name": "seed", "type": int}), default=None,
                   help="seed for reproducible masks (an integer in 0..2**63-1)")

    sub.add_parser("info", parents=[common, model], help="registry entry and parameters of a model")
    sub.add_parser("models", parents=[common], help="list the registered models")
    sub.add_parser("kernel", parents=[common], help="build the small-row CPU kernel and show whether it is used "
                   "(DLM_CPU_KERNEL=auto/on/off)")
    return parser


# ----- commands ----------------------------------------------------------------------------------------------------
def _load(args):
    import dlm
    return dlm.load(args.model, mask_token_id=args.mask_token_id, device=args.device, dtype=args.dtype,
                    quantization=None if args.quantization == "none" else args.quantization, adapter=args.adapter,
                    attn_implementation=args.attn_implementation)


def _sampler_overrides(args) -> dict:
    """The SamplerConfig fields given on the command line (unset ones keep the model's recommended config)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def _run_stream(stream, show_progress: bool, keep: bool = False):
    """Drive a `stream` generator (Frames, then the Generation) with a tqdm bar over the denoising steps; the
    Generation keeps the frames only when `keep`."""
    from tqdm import tqdm

    from .types import Generation
    bar, result, frames = None, None, []
    try:
        for item in stream:
            if isinstance(item, Generation):
                result = item
                continue
            if keep:
                frames.append(item)
            if show_progress:
                if bar is None:
                    bar = tqdm(total=item.total_steps, desc="denoising", unit="step", file=sys.stderr, leave=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if result is None:
        raise RuntimeError("the sampler stopped without a result")
    result.frames = frames if keep else []
    return result


def _generation_payload(args, model, gen) -> dict:
    out = {"command": args.command, "model": model.name}
    out.update(gen.to_dict(frames=args.frames))
    out["tokens_per_second"] = _finite_or_none(gen.tokens_per_second)
    if getattr(args, "animation", None):
        from .animation import save_animation
        out["animation"] = str(save_animation(gen.frames, args.animation, model.tokenizer, model.mask_token_id))
    return out


def _wants_frames(args) -> bool:
    return bool(args.frames or args.animation)


def _show_notes(cfg) -> None:
    """One line on stderr per setting the chosen decoder ignores (`SamplerConfig.ignored_settings`; the library's
    own warnings are silenced unless --debug)."""
    for note in cfg.ignored_settings():
        print(f"{PROG}: note: {note}", file=sys.stderr)


def cmd_generate(args, show_progress: bool) -> dict:
    overrides = _sampler_overrides(args)
    if args.ar:  # checked before loading: a flag left-to-right generation does not read is an error, not ignored
        from .sampler_config import ar_settings
        ignored = [f"--{k.replace('_', '-')}" for k in overrides if k not in ar_settings()]
        if ignored:
            raise CliError(f"{', '.join(ignored)}: not read by --ar (left-to-right) generation; it reads "
                           f"{', '.join('--' + k.replace('_', '-') for k in ar_settings())}")
    model = _load(args)
    prompt, messages = args.prompt, None
    if args.chat:
        prompt, messages = None, [{"role": "user", "content": args.prompt}]
    if args.ar:
        if args.animation:
            gen = _run_stream(model.ar_stream(prompt, messages=messages, **overrides), show_progress, keep=True)
        else:
            gen = model.ar_generate(prompt, messages=messages, **overrides)
    else:
        from .generation import resolve_config
        cfg = resolve_config(model, None, **overrides)
        _show_notes(cfg)
        gen = _run_stream(model.stream(prompt, cfg, messages=messages), show_progress, keep=_wants_frames(args))
    return _generation_payload(args, model, gen)


def cmd_infill(args, show_progress: bool) -> dict:
    from .infill import infill_config
    model = _load(args)
    cfg = infill_config(model, None, **_sampler_overrides(args))
    _show_notes(cfg)
    gen = _run_stream(model.stream_infill(args.prefix, args.suffix, args.length, cfg), show_progress,
                      keep=_wants_frames(args))
    return _generation_payload(args, model, gen)


def cmd_fill(args, show_progress: bool) -> dict:
    from .infill import infill_config
    model = _load(args)
    cfg = infill_config(model, None, **_sampler_overrides(args))
    _show_notes(cfg)
    gen = _run_stream(model.stream_fill(args.template, cfg), show_progress, keep=_wants_frames(args))
    return _generation_payload(args, model, gen)


def cmd_score(args, show_progress: bool) -> dict:
    from . import likelihood
    model = _load(args)
    if args.method == "ar":
        result = likelihood.ar_score(model, args.context, args.continuation)
    else:
        result = likelihood.score(model, args.context, args.continuation, n_samples=args.n_samples,
                                  method=args.method, seed=args.seed, batch_size=args.batch_size)
    out = {"command": "score", "model": model.name, "method": args.method,
           "n_samples": None if args.method == "ar" else args.n_samples}
    out.update({k: _finite_or_none(v) for k, v in result.to_dict().items()})
    return out


def _spec_dict(spec) -> dict:
    from dataclasses import asdict
    return asdict(spec)


def cmd_info(args, show_progress: bool) -> dict:
    from . import model_registry
    from .families import memory_for
    out: dict = {"command": "info", "model": args.model, "registry": None}
    out["memory_gib"] = memory_for(args.model)   # per precision, from the config, before anything loads
    if model_registry.is_registered(args.model):
        out["registry"] = _spec_dict(model_registry.get(args.model))
        out["available"] = model_registry.is_available(args.model)
        if not out["available"]:
            return out  # e.g. a hub model without network: show the entry, load nothing
    model = _load(args)
    tok = model.tokenizer
    out.update({
        "name": model.name, "family": model.config.base_family, "parameters": model.num_parameters(),
        "vocab_size": model.vocab_size, "max_length": model.max_length, "mask_token_id": model.mask_token_id,
        "mask_token": tok.convert_ids_to_tokens(model.mask_token_id) if model.mask_token_id < len(tok) else None,
        "shift": model.shift, "adapted": model.config.adapted, "ar_counterpart": model.ar_counterpart,
        "eos_token_ids": model.eos_token_ids, "device": str(model.device), "dtype": str(model.dtype).split(".")[-1],
        "attn_implementation": model.attn_implementation, "quantization": model.quantization,
    })
    return out


def cmd_models(args, show_progress: bool) -> dict:
    from . import model_registry
    rows = []
    for spec in model_registry.list_models():
        row = _spec_dict(spec)
        row["available"] = model_registry.is_available(spec.name)
        rows.append(row)
    return {"command": "models", "models": rows}


def cmd_kernel(args, show_progress: bool) -> dict:
    from . import cpu_kernel, packed_linear
    return {"command": "kernel", **cpu_kernel.status(), **packed_linear.status()}


COMMANDS = {"generate": cmd_generate, "infill": cmd_infill, "fill": cmd_fill, "score": cmd_score,
            "info": cmd_info, "models": cmd_models, "kernel": cmd_kernel}


# ----- output ------------------------------------------------------------------------------------------------------
def _finite_or_none(value):
    """JSON has no NaN / inf: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_human(out: dict) -> None:
    cmd = out["command"]
    if cmd in ("generate", "infill", "fill"):
        print(out["text"])
        extra = f", spans={out['spans']}" if out.get("spans") else ""
        print(f"[{out['model']}] nfe={out['nfe']} seconds={out['seconds']:.3f} tokens={len(out['token_ids'])}"
              f"{extra}", file=sys.stderr)
    elif cmd == "score":
        se = out["stderr"]
        se_text = "n/a" if se is None else f"{se:.4f}"
        print(f"logprob={out['logprob']:.4f} stderr={se_text} n_tokens={out['n_tokens']} method={out['method']}")
    elif cmd in ("info", "kernel"):
        for key, value in out.items():
            if key == "registry" and isinstance(value, dict):
                for k, v in value.items():
                    print(f"registry.{k}: {v}")
            elif key != "command":
                print(f"{key}: {value}")
    elif cmd == "models":
        width = max(len(m["name"]) for m in out["models"])
        for m in out["models"]:
            flag = "available" if m["available"] else "not available offline"
            print(f"{m['name']:<{width}}  {m['kind']:<3}  {m['family']:<6}  {m['params']:>5}  {flag}")


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: no transformers / hub progress bars or advisory warnings."""
    import warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers missing or changed: nothing to silence
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = " ".join(exc.args[0].split())  # KeyError's str() adds quotes
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet_libraries()
    show_progress = sys.stderr.isatty() and not args.no_progress
    try:
        out = COMMANDS[args.command](args, show_progress)
        text = json.dumps(out, ensure_ascii=False, allow_nan=False) if args.json else None
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    if text is not None:
        print(text)
    else:
        _print_human(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
