"""Training configuration: dataclasses with working defaults, YAML presets that only override, `key=value` overrides.

A config is `TrainConfig` with one section per concern (model, lora, data, sft, diffusion, optim, run). A YAML file
is a nested mapping of the same shape; anything it leaves out keeps the dataclass default. Command-line overrides
are `section.field=value` (or just `field=value` when the field name is unique across sections); values are parsed
as YAML scalars/lists and then checked against the field's type.

Every error names the offending key: unknown keys (with a "did you mean"), wrong types, out-of-range values and
invalid combinations fail before any model or data is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from dlm.load_options import ATTN_IMPLEMENTATIONS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


# ----- sections ------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Which weights become the diffusion LM.

    source:              registry name (`smollm2-135m`, `gpt2`, ...), local HF dir / .gguf, or hub id. Ignored when
                         `init` is set.
    init:                build a *random* model instead: transformers config kwargs incl. `model_type`
                         (e.g. {model_type: llama, hidden_size: 64, ...}); vocab/special ids come from `tokenizer`.
    tokenizer:           tokenizer for `init` models: registry name, HF dir or .gguf path, or `bpe:N` (learn a
                         byte-level BPE of N tokens from data.sources: tiny models stay tiny).
    mask_token_id:       explicit [MASK] id (default: what `dlm.load` decides: saved > tokenizer > new `<|mask|>`).
    shift:               paper's shift (hidden i predicts token i+1). `false` = the "no shift" ablation.
    dtype:               weight dtype: float32 (master weights; use run.mixed_precision=bf16 for autocast) or
                         bfloat16 (pure-bf16 weights and optimizer state: fastest on CPU, least exact).
    attn_implementation: auto / sdpa / eager / flash_attention_2 (full attention only: needs diffusion.anneal_steps=0).
    from_scratch:        re-initialise the weights (the paper's "adaptation vs training from scratch" ablation).
    """

    source: str = "smollm2-135m"
    init: dict = field(default_factory=dict)
    tokenizer: str = "smollm2-135m"
    mask_token_id: Optional[int] = None
    shift: bool = True
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    attn_implementation: str = field(default="auto",
                                     metadata=_choices(*ATTN_IMPLEMENTATIONS))
    from_scratch: bool = False


@dataclass
class LoraConfigSection:
    """LoRA through peft (off = full fine-tuning).

    enabled:             train LoRA adapters instead of all weights.
    r / alpha / dropout: LoRA rank, scaling numerator, dropout on the adapter input.
    target_modules:      module names, or ["all-linear"] (every linear layer except the output head).
    train_mask_row:      also train the [MASK] embedding row (peft `trainable_token_indices`): a new mask token
                         starts untrained, so without this the model cannot learn what [MASK] means.
    trainable_token_ids: extra embedding rows to train the same way.
    modules_to_save:     modules trained and saved in full (e.g. ["embed_tokens", "lm_head"]).
    init_from:           warm start: a LoRA adapter directory (or the registry name of a shipped adapter such as
                         smollm2-135m-dlm) whose weights the run continues training; its r / alpha / targets
                         replace the ones above. "" = fresh LoRA.
    row_gate:            a draft adapter: in block forwards the adapter runs on the noisy rows only, so the clean
                         rows stay the base model exactly and the speculative decoder's verifier is the AR base
                         (`dlm.adapter_routing`; exported with dlm_config row_gated). Needs diffusion.attention
                         blocks (full-attention steps would train the adapter on every row).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["all-linear"])
    train_mask_row: bool = True
    trainable_token_ids: list = field(default_factory=list)
    modules_to_save: list = field(default_factory=list)
    init_from: str = ""
    row_gate: bool = False


@dataclass
class DataConfig:
    """The corpus, tokenized once into a cached memory-mapped token file, packed into fixed blocks.

    sources:        files (.txt, .txt.gz, .jsonl, .jsonl.gz), directories (all such files inside), globs, or
                    `hf:NAME[:CONFIG]` for a Hugging Face dataset (streamed when the network is there).
    text_field:     JSONL / HF field holding the text.
    hf_split:       split of a HF dataset.
    clean:          cleaning hook per document: none / gutenberg (strip the licence outside the
                    `*** START OF` / `*** END OF` markers, CRLF -> LF).
    block_size:     tokens per training sequence (documents are joined with EOS and packed).
    eval_fraction:  fraction of the token stream held out for evaluation (whole documents at the end of the
                    shuffled document order, so for Gutenberg these are held-out books).
    eval_sources:   explicit held-out files instead (then eval_fraction is ignored).
    max_documents:  read at most this many documents per source list (0 = all).
    max_tokens:     stop tokenizing after this many tokens (0 = all; required for streamed HF datasets).
    shuffle_documents: shuffle the file order (seeded by `seed`) before splitting; False keeps sorted order.
    seed:           data-order seed (document shuffle and block order).
    skip_blocks:    start this many blocks into the seeded block order. A warm-started continuation sets it to
                    what its warm start consumed (steps x batch), so it trains on text the adapter has not seen;
                    the held-out split does not move (it depends on `seed` only).
    cache_dir:      where token files live (default: $DLM_CACHE_DIR or ~/.cache/dlm-studio, then /tokens).
    weights:        one positive weight per entry of `sources` (normalised): the sources are interleaved so each
                    one's share of the tokens follows its weight (`train.data.WeightedMixer`); [] = read them one
                    after another.
    exclude:        file names (not paths) left out of `sources`, e.g. the books a benchmark holds out.
    """

    sources: list = field(default_factory=list)
    text_field: str = "text"
    hf_split: str = "train"
    clean: str = field(default="none", metadata=_choices("none", "gutenberg"))
    block_size: int = 512
    eval_fraction: float = 0.01
    eval_sources: list = field(default_factory=list)
    max_documents: int = 0
    max_tokens: int = 0
    shuffle_documents: bool = True
    seed: int = 1234
    skip_blocks: int = 0
    cache_dir: str = ""
    weights: list = field(default_factory=list)
    exclude: list = field(default_factory=list)


@dataclass
class SFTConfig:
    """Diffusion SFT: the prompt is never noised, the response is.

    prompt_template / response_template: Python format strings over the JSONL record's fields
                    (GSM8K: question / answer).
    chat_template:  wrap the prompt with the tokenizer's chat template (instruct models).
    max_length:     fixed canvas length (prompt + response + padding); longer pairs are truncated
                    (prompt from the left, response from the right).
    padding:        pad   - DiffuSeq style: pad up to max_length with `pad_token_id`, padding is a (noised)
                            target, so the model learns where the answer ends;
                    eos   - pad with EOS, padding is a target (LLaDA style);
                    ignore- padding is neither attended to nor a target (variable-length answers need a length).
    pad_token_id:   id used by `padding=pad` (default: the tokenizer's pad token, else EOS).
    record_format:  plain (records as they are) or gsm8k_symbolic (GSM8K's `answer` rewritten to the paper's SFT
                    form: only its `<<...>>` equations, then `#### answer`; `evals.metrics.gsm8k_symbolic`).
    """

    prompt_template: str = "Question: {question}\nAnswer: "
    response_template: str = "{answer}"
    chat_template: bool = False
    max_length: int = 256
    padding: str = field(default="pad", metadata=_choices("pad", "eos", "ignore"))
    pad_token_id: Optional[int] = None
    record_format: str = field(default="plain", metadata=_choices("plain", "gsm8k_symbolic"))


@dataclass
class DiffusionConfig:
    """The training objective and the paper's ablation switches.

    objective:    diffusion (Eq. 7) or ar (plain causal-LM loss, same model and loop: the baseline / benchmark).
    attention:    full (the paper: bidirectional over the whole sequence, with annealing; what infilling and
                  any-order decoding need), blocks (block diffusion: causal across blocks, bidirectional inside
                  one, the [x_t; x_0] staircase; what the fast block decoder needs), or mixture (each optimizer
                  step draws one of the two, `block_fraction` of the steps are blocks: one adapter for both).
    block_lengths: block sizes for blocks / mixture steps; each block step draws one (LLaDA 2.0 trains one model
                  across block sizes). Size 1 is the causal LM itself.
    block_fraction: mixture only: share of optimizer steps that use the block objective.
    clean_attention: block steps: clean tokens attend token-causally ("causal": every clean row stays an AR
                  predictor, which the speculative decoder verifies drafts with) or block-causally ("block").
                  Recorded in the exported dlm_config.json; the decoders follow it.
    ar_weight:    block steps: weight of a next-token CE on the clean rows (keeps the clean path a good AR model;
                  0 = only the masked tokens of x_t carry loss, as in BD3-LM).
    distill_weight: block steps: weight of KL(base || student) at the masked tokens and the clean rows, the base's
                  next-token distributions from the frozen base (the LoRA adapter disabled, one extra forward
                  without gradients): a whole distribution per token instead of one id (needs lora.enabled).
    draft_loss:   block steps: the masked tokens' loss (`dlm.draft_objectives`): ce (the data's token, Eq. 7),
                  or toward the verifier's distribution: kd (KL), accept (1 - acceptance rate), kd+accept. The
                  verifier is the base: the clean rows of the same forward with lora.row_gate, else the frozen base
                  (one extra forward). reach: weight each masked token by the chance decoding reaches it.
    full_mask:    block steps: share of blocks masked whole (t = 1), the speculative decoder's drafting case.
    accept_temperature: the temperature of the acceptance rate in `accept` and `reach` (decoding's, e.g. 0.7).
    anneal_steps: attention-mask annealing length: ratio = min(1, step / anneal_steps); 0 = no annealing
                  (bidirectional from the first step: the "annealing off" ablation). Full-attention steps only.
    weighting:    inverse_t (Eq. 7's 1/t) or none (the "no 1/t weighting" ablation).
    eps:          t ~ U(eps, 1) keeps 1/t bounded.
    """

    objective: str = field(default="diffusion", metadata=_choices("diffusion", "ar"))
    attention: str = field(default="full", metadata=_choices("full", "blocks", "mixture"))
    block_lengths: list = field(default_factory=lambda: [4])
    block_fraction: float = 0.5
    clean_attention: str = field(default="causal", metadata=_choices("causal", "block"))
    ar_weight: float = 0.0
    distill_weight: float = 0.0
    draft_loss: str = field(default="ce", metadata=_choices("ce", "kd", "accept", "kd+accept"))
    reach: bool = False
    full_mask: float = 0.0
    accept_temperature: float = 1.0
    anneal_steps: int = 0
    weighting: str = field(default="inverse_t", metadata=_choices("inverse_t", "none"))
    eps: float = 1e-3


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr` at max_steps (or constant).

    lr, weight_decay, beta1, beta2, adam_eps: AdamW. grad_clip: max global grad norm (0 = off).
    warmup_steps: linear warmup from 0. schedule: cosine / constant. min_lr_ratio: cosine floor.
    """

    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 100
    schedule: str = field(default="cosine", metadata=_choices("cosine", "constant"))
    min_lr_ratio: float = 0.1


@dataclass
class RunConfig:
    """How the run is executed, saved and observed.

    output_dir:      checkpoints/, final/, metrics.jsonl, config.yaml go here.
    max_steps:       optimizer steps.
    max_minutes:     also stop after this many minutes of training steps (0 = no limit; for fixed-length leases
                     such as the GPU runbook's). The run then ends as at max_steps (checkpoint, eval, export);
                     the learning-rate schedule still follows max_steps.
    batch_size:      sequences per device per micro-batch; global batch = batch_size * grad_accum * processes.
    grad_accum:      micro-batches per optimizer step.
    mixed_precision: no / bf16 / fp16 (autocast via accelerate; fp16 needs a GPU) / auto: bf16 on a GPU that
                     supports it (else fp16), on a CPU only with native bf16 (AMX / AVX512-BF16: without it bf16
                     autocast was ~40% *slower* than fp32 for SmolLM2-135M here), else no.
    gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
    compile:         torch.compile the base model.
    save_every:      checkpoint every N steps and at the end (0 = no checkpoints, only the final export: such a
                     run cannot be resumed). keep_last: checkpoints kept.
    resume:          "" (fresh; refuses a non-empty checkpoints dir), auto (newest valid checkpoint, or fresh),
                     or a checkpoint / output directory path.
    eval_every:      held-out evaluation every N steps (0 = only at the end). eval_batches / eval_batch_size:
                     how many held-out blocks are scored (fixed set, so the curve is comparable).
    eval_mask_ratios: masked-token accuracy is reported at these ratios. eval_elbo_samples: MC samples of the
                     ELBO perplexity bound (0 = skip). eval_block_length: also report block-diffusion accuracy
                     (eval/block_acc@r) with blocks of this size; 0 = the first of diffusion.block_lengths when
                     diffusion.attention is blocks / mixture, else off.
    log_every:       metrics line every N steps. progress: tqdm bar on the main process.
    seed:            model init / noise / dropout seed.
    threads:         torch intra-op threads (0 = torch default).
    tensorboard:     also log to TensorBoard when it is installed.
    export:          write OUTPUT_DIR/final at the end (benchmarks turn it off).
    export_every:    also write a loadable model (the LoRA adapter, or the weights) to OUTPUT_DIR/exports/step-N
                     every N steps (0 = never), for accuracy-vs-steps curves (`dlm-eval --model .../step-N`).
                     Not under ZeRO-3 / FSDP (parameters are sharded between checkpoints).
    """

    output_dir: str = "runs/default"
    max_steps: int = 1000
    max_minutes: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    mixed_precision: str = field(default="no", metadata=_choices("no", "bf16", "fp16", "auto"))
    gradient_checkpointing: bool = False
    compile: bool = False
    save_every: int = 500
    keep_last: int = 3
    resume: str = ""
    eval_every: int = 500
    eval_batches: int = 4
    eval_batch_size: int = 8
    eval_mask_ratios: list = field(default_factory=lambda: [0.15, 0.5, 0.9])
    eval_elbo_samples: int = 4
    eval_block_length: int = 0
    log_every: int = 10
    progress: bool = True
    seed: int = 0
    threads: int = 0
    tensorboard: bool = True
    export: bool = True
    export_every: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = [f.name for f in dataclasses.fields(TrainConfig)]


# ----- keys ----------------------------------------------------------------------------------------------------------
def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _all_keys() -> dict[str, list[str]]:
    """field name -> sections that have it (for short `field=value` overrides)."""
    out: dict[str, list[str]] = {}
    for section in SECTIONS:
        cls = _field_types(TrainConfig)[section]
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(section)
    return out


def _unknown(key: str) -> ConfigError:
    candidates = [f"{s}.{n}" for n, secs in _all_keys().items() for s in secs] + SECTIONS
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; sections: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' or 'lr' -> ('optim', 'lr'); ConfigError for unknown or ambiguous keys."""
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise _unknown(key)
        cls = _field_types(TrainConfig)[section]
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(key)
        return section, name
    sections = _all_keys().get(key)
    if not sections:
        raise _unknown(key)
    if len(sections) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous; write one of "
                          + ", ".join(f"{s}.{key}" for s in sections))
    return sections[0], key


def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=1e-4' -> ('optim.lr', '1e-4'): the key and the raw value (OmegaConf parses it)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key, raw.strip()


# ----- merging: OmegaConf structured configs do the typing ----------------------------------------------------------
def _layer(data, origin: str):
    """A YAML mapping / dotlist as an OmegaConf layer over TrainConfig: unknown keys are refused with a "did you
    mean", and YAML 1.1 booleans given to string fields (`mixed_precision: no`) are read back as the words."""
    from omegaconf import DictConfig, OmegaConf
    if data is None:
        return OmegaConf.create({})
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
    hints = _field_types(TrainConfig)
    for section in list(data.keys()):
        if section not in SECTIONS:
            raise _unknown(str(section))
        values = data[section]
        if values is None:
            del data[section]
            continue
        if not isinstance(values, DictConfig):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
        types = _field_types(hints[section])
        for name in list(values.keys()):
            resolve_key(f"{section}.{name}")
            if types[name] is str and isinstance(values[name], bool):
                values[name] = "yes" if values[name] else "no"
    return data


def _merge(layers) -> TrainConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # wrong type: OmegaConf names the key, we keep one line
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def _file_layers(name_or_path: str, chain: tuple) -> list:
    """The layers of a YAML file: those of the preset it names in `include:` (a variant states only what it
    changes, e.g. gsm8k-sft-ar over gsm8k-sft), then its own."""
    from omegaconf import DictConfig, OmegaConf
    file = find_config(name_or_path)
    if file.resolve() in chain:
        raise ConfigError(f"{file}: include cycle ({' -> '.join(p.name for p in chain)} -> {file.name})")
    try:
        data = OmegaConf.load(file)
    except Exception as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    layers = []
    if isinstance(data, DictConfig) and "include" in data:
        parent = data.pop("include")
        if not isinstance(parent, str):
            raise ConfigError(f"{file}: include must be one preset name or path, got {parent!r}")
        layers = _file_layers(parent, chain + (file.resolve(),))
    return layers + [_layer(data, str(file))]


def find_config(name_or_path: str) -> Path:
    """A path, or the name of a preset in train/configs (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found (not a file; presets: {presets})")


def _resolve_relative(cfg: TrainConfig, base_dir: Path) -> None:
    """Relative data paths that do not exist from the working directory are taken from the repository root
    (presets say `train/data/...` and `../shared/data/...`), so commands work from any directory."""
    repo = PACKAGE_DIR.parent

    def fix(p: str) -> str:
        if p.startswith("hf:") or Path(p).is_absolute() or Path(p).exists():
            return p
        return str(repo / p) if (repo / p).exists() else p

    cfg.data.sources = [fix(s) for s in cfg.data.sources]
    cfg.data.eval_sources = [fix(s) for s in cfg.data.eval_sources]


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- YAML preset/file <- `key=value` overrides (merged by OmegaConf over the dataclasses), then
    `validate`."""
    from omegaconf import OmegaConf
    layers = _file_layers(path, ()) if path else []
    dotlist = []
    for text in overrides or []:
        key, value = parse_override(text)
        section, name = resolve_key(key)
        dotlist.append(f"{section}.{name}={value}")
    if dotlist:
        layers.append(_layer(OmegaConf.from_dotlist(dotlist), "overrides"))
    cfg = _merge(layers)
    _resolve_relative(cfg, Path.cwd())
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig, task: str = "pretrain") -> TrainConfig:
    """Range and combination checks; each message names the key."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for section in SECTIONS:  # choices (the dataclass metadata) before the ranges
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            choices = f.metadata.get("choices")
            if choices and getattr(sec, f.name) not in choices:
                raise ConfigError(f"{section}.{f.name}: must be one of {', '.join(choices)}, "
                                  f"got {getattr(sec, f.name)!r}")
    r, o, d, m = cfg.run, cfg.optim, cfg.data, cfg.model
    need(r.max_steps >= 1, "run.max_steps", f"must be >= 1, got {r.max_steps}")
    need(r.max_minutes >= 0, "run.max_minutes", f"must be >= 0 (0 = no limit), got {r.max_minutes}")
    need(r.batch_size >= 1, "run.batch_size", f"must be >= 1, got {r.batch_size}")
    need(r.grad_accum >= 1, "run.grad_accum", f"must be >= 1, got {r.grad_accum}")
    need(r.save_every >= 0, "run.save_every", f"must be >= 0, got {r.save_every}")
    need(r.keep_last >= 1, "run.keep_last", f"must be >= 1, got {r.keep_last}")
    need(r.eval_every >= 0, "run.eval_every", f"must be >= 0, got {r.eval_every}")
    need(r.eval_batches >= 0, "run.eval_batches", f"must be >= 0, got {r.eval_batches}")
    need(r.eval_batch_size >= 1, "run.eval_batch_size", f"must be >= 1, got {r.eval_batch_size}")
    need(r.log_every >= 1, "run.log_every", f"must be >= 1, got {r.log_every}")
    need(r.threads >= 0, "run.threads", f"must be >= 0, got {r.threads}")
    need(r.eval_elbo_samples >= 0, "run.eval_elbo_samples", f"must be >= 0, got {r.eval_elbo_samples}")
    need(r.eval_block_length >= 0, "run.eval_block_length", f"must be >= 0 (0 = auto), got {r.eval_block_length}")
    need(bool(r.output_dir), "run.output_dir", "must not be empty")
    for x in r.eval_mask_ratios:
        need(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < float(x) <= 1,
             "run.eval_mask_ratios", f"each ratio must be a number in (0, 1], got {x!r}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    need(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    need(o.adam_eps > 0, "optim.adam_eps", f"must be > 0, got {o.adam_eps}")
    need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(d.block_size >= 4, "data.block_size", f"must be >= 4, got {d.block_size}")
    need(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    need(d.max_documents >= 0, "data.max_documents", f"must be >= 0, got {d.max_documents}")
    need(d.max_tokens >= 0, "data.max_tokens", f"must be >= 0, got {d.max_tokens}")
    need(d.skip_blocks >= 0, "data.skip_blocks", f"must be >= 0, got {d.skip_blocks}")
    need(not d.weights or len(d.weights) == len(d.sources), "data.weights",
         f"needs one weight per data.sources entry ({len(d.sources)}), got {len(d.weights)}")
    need(all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in d.weights),
         "data.weights", f"must be positive numbers, got {list(d.weights)}")
    need(0 < cfg.diffusion.eps < 1, "diffusion.eps", f"must be in (0, 1), got {cfg.diffusion.eps}")
    need(cfg.diffusion.anneal_steps >= 0, "diffusion.anneal_steps",
         f"must be >= 0 (0 = no annealing), got {cfg.diffusion.anneal_steps}")
    dc = cfg.diffusion
    dc.block_lengths = [int(b) if isinstance(b, str) and b.strip().isdigit() else b for b in dc.block_lengths]
    need(bool(dc.block_lengths) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                        for b in dc.block_lengths),
         "diffusion.block_lengths", f"must be a list of positive integers, got {dc.block_lengths!r}")
    need(0.0 <= dc.block_fraction <= 1.0, "diffusion.block_fraction", f"must be in [0, 1], got {dc.block_fraction}")
    need(dc.ar_weight >= 0, "diffusion.ar_weight", f"must be >= 0, got {dc.ar_weight}")
    need(dc.distill_weight >= 0, "diffusion.distill_weight", f"must be >= 0, got {dc.distill_weight}")
    need(dc.distill_weight == 0 or cfg.lora.enabled, "diffusion.distill_weight",
         "needs lora.enabled: the frozen base (the adapter disabled) is the teacher")
    need(dc.distill_weight == 0 or dc.attention != "full", "diffusion.distill_weight",
         "applies to block steps: needs diffusion.attention blocks or mixture")
    need(0.0 <= dc.full_mask <= 1.0, "diffusion.full_mask", f"must be in [0, 1], got {dc.full_mask}")
    need(0.0 < dc.accept_temperature <= 10.0, "diffusion.accept_temperature",
         f"must be in (0, 10], got {dc.accept_temperature}")
    need(not cfg.lora.row_gate or (cfg.lora.enabled and dc.attention == "blocks"), "lora.row_gate",
         "needs lora.enabled and diffusion.attention blocks (a draft adapter trains on block steps only)")
    need((dc.draft_loss == "ce" and not dc.reach) or cfg.lora.enabled, "diffusion.draft_loss",
         "needs lora.enabled: the verifier is the base model (the adapter gated or disabled)")
    if dc.attention != "full":
        need(m.attn_implementation != "flash_attention_2", "diffusion.attention",
             "block attention needs sdpa/eager attention (flash_attention_2 takes no custom mask)")
    need(cfg.sft.max_length >= 4, "sft.max_length", f"must be >= 4, got {cfg.sft.max_length}")
    need(bool(m.source) or bool(m.init), "model.source", "set a model source, or model.init for a random model")
    if m.init:
        need("model_type" in m.init, "model.init", "needs a model_type (e.g. llama, gpt2)")
        need(bool(m.tokenizer), "model.tokenizer", "a random model (model.init) needs a tokenizer source")
    if m.mask_token_id is not None:
        need(m.mask_token_id >= 0, "model.mask_token_id", f"must be >= 0, got {m.mask_token_id}")
    if cfg.lora.enabled:
        need(cfg.lora.r >= 1, "lora.r", f"must be >= 1, got {cfg.lora.r}")
        need(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
        need(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
        need(bool(cfg.lora.target_modules), "lora.target_modules", "must name at least one module (or all-linear)")
        need(not m.from_scratch, "lora.enabled", "LoRA on randomly initialised weights (model.from_scratch) "
                                                 "makes no sense; use full training")
    if m.attn_implementation == "flash_attention_2":
        need(cfg.diffusion.anneal_steps == 0 or cfg.diffusion.objective == "ar", "diffusion.anneal_steps",
             "attention-mask annealing needs sdpa/eager attention; flash_attention_2 supports only full attention "
             "(set diffusion.anneal_steps=0 or model.attn_implementation=sdpa)")
    if r.mixed_precision == "fp16" and m.dtype != "float32":
        raise ConfigError("run.mixed_precision: fp16 autocast needs float32 master weights (model.dtype=float32)")
    if r.resume not in ("", "auto") and not Path(r.resume).expanduser().exists():
        raise ConfigError(f"run.resume: {r.resume!r} does not exist (use auto, or a checkpoint directory)")
    if task == "sft":
        need(bool(d.sources), "data.sources", "SFT needs a JSONL file of prompt/response records")
    return cfg
