"""`python -m evals`: the paper's Table 1 (and generation quality) for one model, as a command.

    python -m evals --model smollm2-135m --tasks piqa,siqa,winogrande,lambada --limit 200 --out runs/eval/smol-ar
    python -m evals --model smollm2-135m-dlm --tasks rocstories,genppl64 --out runs/eval/smol-dlm
    python -m evals --model smollm2-135m --kind dlm --tasks piqa --out runs/eval/smol-unadapted   # baseline
    python -m evals table runs/eval/smol-ar runs/eval/smol-dlm                                # one table
    python -m evals table --by shots runs/eval/dlm-k0 runs/eval/dlm-k4                       # k-shot layout
    python -m evals compare runs/eval/smol-ar runs/eval/smol-dlm                              # paired B - A
    python -m evals rescore runs/eval/gsm8k-ar                                               # re-read answers
    python -m evals list                                                                     # tasks + data
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dlm.cli import non_negative_int, positive_int
from dlm.sampler_config import ar_settings

from .data import MissingDataError, default_data_dir, file_fingerprints, recording_files
from .eval_model import KINDS, SCORE_METHODS, EvalSettings, default_kind
from .metrics import GSM8K_FORMATS
from .report import comparison_table, table_from_dirs
from .runner import eprint, evaluate, rescore
from .tasks import GENPPL, TASKS, get_task, mc_file_spec

DEFAULT_TASKS = "piqa,siqa,winogrande,lambada"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, local directory / .gguf, or hub id")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="evaluate as an AR or a diffusion LM (default: dlm for adapted checkpoints, ar for plain "
                        "causal LMs; --kind dlm on a plain LM is the un-adapted baseline)")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated: {', '.join(TASKS)}, genppl / genppl<N> (default {DEFAULT_TASKS}); "
                        "'' with --task-file runs only the file")
    p.add_argument("--task-file", action="append", default=[], type=Path, metavar="PATH",
                   help='extra multiple-choice JSONL task ({"context", "choices", "gold"} per line); repeatable')
    p.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task (default all)")
    p.add_argument("--skip", type=non_negative_int, default=0, metavar="N",
                   help="leave out the first N examples (a dev slice disjoint from a reported --limit run, for "
                        "choosing settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory (resumable)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"task data folder (default $DLM_DATA_DIR or {default_data_dir()})")
    p.add_argument("--label", default="", help="row name in the table (default: the model)")
    p.add_argument("--overwrite", action="store_true", help="discard predictions made with other settings")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16, fp32")
    g = p.add_argument_group("likelihood (DLM)")
    g.add_argument("--n-samples", type=positive_int, default=32, help="ELBO samples / paper noise levels")
    g.add_argument("--score-method", choices=SCORE_METHODS, default="elbo")
    g = p.add_argument_group("generation")
    g.add_argument("--sampler", action="append", default=[], metavar="FIELD=VALUE",
                   help="DLM generation: a dlm.SamplerConfig field over the model's recommended writing config "
                        "(repeatable), e.g. --sampler steps=16 --sampler decoder=full")
    g.add_argument("--infill-sampler", action="append", default=[], metavar="FIELD=VALUE",
                   help="the same for infilling tasks (over the model's full-attention infilling config)")
    g.add_argument("--oracle-length", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the reference answer's number of tokens (the paper's setting; default)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer budget with --no-oracle-length (default per task)")
    g.add_argument("--chat", action="store_true", help="GSM8K: use the tokenizer's chat template")
    g.add_argument("--gsm8k-format", choices=list(GSM8K_FORMATS), default="full",
                   help="GSM8K solutions in shots and for the oracle length: the worked text, or only the <<...>> "
                        "equations and #### answer (the paper's SFT form; for models fine-tuned with gsm8k-sft)")
    g.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per HumanEval program")
    g.add_argument("--shots", type=non_negative_int, default=0,
                   help="TriviaQA / GSM8K: solved examples before each question (k-shot in-context learning)")
    g.add_argument("--samples", type=positive_int, default=1,
                   help="TriviaQA / GSM8K: self-consistency, the majority answer over this many samples")
    g.add_argument("--sample-temperature", type=float, default=0.7, help="temperature of those samples")
    g = p.add_argument_group("generation quality / perplexity")
    g.add_argument("--judge", default="smollm2-135m", help="AR judge for gen-PPL (paper: gpt2-large)")
    g.add_argument("--gen-length", type=positive_int, default=64, help="tokens per sample for 'genppl'")
    g.add_argument("--gen-temperature", type=float, default=1.0)
    g.add_argument("--gen-top-p", type=float, default=1.0)
    g.add_argument("--gen-prompt-words", type=int, default=0, help="0 = unconditional samples")
    g.add_argument("--ppl-max-tokens", type=positive_int, default=128)
    g.add_argument("--heldout-book", default=None,
                   help="Gutenberg file under gutenberg/ (default: the book the checkpoint's training held out, "
                        "from dlm_config training.heldout_books, else pg1661.txt.gz)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def load_task_data(names: list[str], task_files: list[Path], data_dir: Path, settings: EvalSettings,
                   limit: Optional[int], skip: int = 0, files: Optional[dict] = None) -> tuple[list, list[str]]:
    """Resolve task names and read their examples -> ([(spec, examples)], [messages about missing data]);
    examples skip .. skip + limit of each task. `files`, when given, receives {task: [data files it read]}."""
    specs = [get_task(n, settings.gen_length) for n in names] + [mc_file_spec(f) for f in task_files]
    loaded, missing = [], []
    for spec in specs:
        try:
            with recording_files() as read:
                examples = spec.load(data_dir, settings)
        except MissingDataError as e:
            missing.append(str(e))
            continue
        if files is not None:
            files[spec.name] = list(read)
        examples = examples[skip:]
        if not examples:
            missing.append(f"task {spec.name!r}: no examples found" + (f" after the first {skip}" if skip else ""))
            continue
        loaded.append((spec, examples[:limit] if limit else examples))
    return loaded, missing


def run(args: argparse.Namespace) -> int:
    import dlm
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names and not args.task_file:
        raise ValueError("no tasks: give --tasks and/or --task-file")
    for n in names:
        get_task(n)  # unknown names fail before anything is loaded
    data_dir = args.data_dir or default_data_dir()
    common = dict(n_samples=args.n_samples, score_method=args.score_method, sampler=_pairs(args.sampler, "--sampler"),
                  infill_sampler=_pairs(args.infill_sampler, "--infill-sampler"), oracle_length=args.oracle_length,
                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                  gen_length=args.gen_length, gen_temperature=args.gen_temperature, gen_top_p=args.gen_top_p,
                  gen_prompt_words=args.gen_prompt_words, judge=args.judge, ppl_max_tokens=args.ppl_max_tokens,
                  heldout_book=args.heldout_book, chat=args.chat, gsm8k_format=args.gsm8k_format,
                  exec_timeout=args.exec_timeout,
                  shots=args.shots, samples=args.samples, sample_temperature=args.sample_temperature)
    provisional = EvalSettings(kind=args.kind or "ar", **common)
    files: dict = {}
    tasks, missing = load_task_data(names, args.task_file, data_dir, provisional, args.limit, args.skip, files)
    for msg in missing:
        eprint(f"skipping: {msg}")
    if not tasks:
        eprint("nothing to evaluate: no task has its data (see --data-dir)")
        return 1
    model = dlm.load(args.model, device=args.device, dtype=args.dtype)
    kind = args.kind or default_kind(model, args.model)
    if kind == "ar":  # DLM-only knobs do not change AR predictions: keep them out of the resume check
        common.update({name: getattr(EvalSettings, name) for name in _DLM_ONLY}, infill_sampler={})
        common["sampler"] = {k: v for k, v in common["sampler"].items() if k in ar_settings()}
    book = heldout_book_of(model) if args.heldout_book is None else None
    if book:  # the checkpoint says which book its training held out: evaluate perplexity / prompts on that one
        common["heldout_book"] = book
        uses_book = [spec.name for spec, _ in tasks if spec.name == "elbo_ppl" or GENPPL.match(spec.name)]
        reloaded, _ = load_task_data(uses_book, [], data_dir, EvalSettings(**common), args.limit, args.skip, files)
        by_name = {spec.name: (spec, ex) for spec, ex in reloaded}
        tasks = [by_name.get(spec.name, (spec, ex)) for spec, ex in tasks]
    settings = EvalSettings(kind=kind, **common)
    print(f"{args.model}: evaluated as {kind.upper()} on {', '.join(s.name for s, _ in tasks)} -> {args.out}")
    data = {spec.name: file_fingerprints(files.get(spec.name, []), data_dir) for spec, _ in tasks}
    evaluate(model, tasks, args.out, settings, model_id=args.model, label=args.label, overwrite=args.overwrite,
             progress=False if args.no_progress else None, data=data,
             selection={"limit": args.limit, "skip": args.skip, "data_dir": str(Path(data_dir).resolve())})
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    print((args.out / "table.md").read_text())
    return 1 if missing else 0


def heldout_book_of(model) -> Optional[str]:
    """The Gutenberg file a checkpoint's training held out, if its dlm_config records one
    (`training["heldout_books"]`, names or paths; the first is used)."""
    training = getattr(getattr(model, "config", None), "training", None) or {}
    books = training.get("heldout_books") if isinstance(training, dict) else None
    if isinstance(books, str):
        books = [books]
    return Path(books[0]).name if books else None


_DLM_ONLY = ("n_samples", "score_method")


def _pairs(items: list[str], flag: str) -> dict:
    """["steps=16", "decoder=full"] -> {"steps": "16", "decoder": "full"} (SamplerConfig coerces the values)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{flag}: expected FIELD=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def table_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m evals table", description="merge run directories into one table")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    p.add_argument("--by", choices=["model", "shots"], default="model",
                   help="model: one row per run, one column per task (Table 1); shots: one row per model and task, "
                        "one column per --shots value (runs of one model with different --shots merge)")
    args = p.parse_args(argv)
    return _emit(table_from_dirs(args.dirs, by=args.by), args.out)


def _emit(text: str, out: Optional[Path]) -> int:
    """Print a table, and write it to `out` too when given."""
    print(text)
    if out:
        out.write_text(text, encoding="utf-8")
    return 0


def compare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m evals compare",
                                description="run B against run A on the examples both scored: paired differences")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: every task both runs have)")
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = p.parse_args(argv)
    for d in (args.a, args.b):
        if not (d / "results.json").is_file():
            eprint(f"{d} has no results.json (not an evals --out directory?)")
            return 2
    return _emit(comparison_table(args.a, args.b, [t for t in args.tasks.split(",") if t]), args.out)


def rescore_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m evals rescore",
                                description="read answers again from the stored generations (no model is loaded)")
    p.add_argument("dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    for d in args.dirs:
        rescore(d)
    return 0


def list_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m evals list", description="tasks and whether their data is present")
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    print(f"data dir: {data_dir}")
    for name, spec in TASKS.items():
        try:
            n = len(spec.load(data_dir, EvalSettings(kind="ar")))
            status = f"{n} examples"
        except MissingDataError:
            status = "data missing"
        print(f"  {name:18s} {status:16s} {spec.description}")
    print(f"  {'genppl<N>':18s} {'(held-out book)':16s} N-token samples: gen-PPL under an AR judge, distinct-2")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table":
        return table_main(argv[1:])
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "rescore":
        return rescore_main(argv[1:])
    if argv and argv[0] == "list":
        return list_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        eprint("interrupted: finished examples are saved; rerun the same command to resume")
        return 130
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        eprint(f"error: {message}" if isinstance(e, (ValueError, OSError, KeyError)) else
               f"error: {type(e).__name__}: {message}")
        return 1


__all__ = ["main", "build_parser"]
