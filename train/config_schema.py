"""The training configuration's schema: one dataclass per section (model, lora, data, sft, diffusion, optim, run)
with working defaults, and beside each default what `train.config.validate` checks: its choices (`_choices`) or its
range (`_min`, `_within`). `train.config` reads YAML presets and overrides into it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import yaml

from dlm.load_options import ATTN_IMPLEMENTATIONS


def _choices(*values: str) -> dict:
    return {"choices": values}


def _min(lo, note: str = "", *, strict: bool = False) -> dict:
    """A lower bound (`validate` checks it): >= lo, or > lo when strict; `note` says what the bound means."""
    return {"range": (lo, None, "(" if strict else "[", note)}


def _within(lo, hi, brackets: str = "[]") -> dict:
    """An interval (`validate` checks it): brackets "[]", "[)", "(]" or "()"."""
    return {"range": (lo, hi, brackets, "")}


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
    mask_token_id: Optional[int] = field(default=None, metadata=_min(0))
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
    r: int = field(default=16, metadata=_min(1))
    alpha: int = field(default=32, metadata=_min(0, strict=True))
    dropout: float = field(default=0.0, metadata=_within(0, 1, "[)"))
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
    block_size: int = field(default=512, metadata=_min(4))
    eval_fraction: float = field(default=0.01, metadata=_within(0, 1, "[)"))
    eval_sources: list = field(default_factory=list)
    max_documents: int = field(default=0, metadata=_min(0))
    max_tokens: int = field(default=0, metadata=_min(0))
    shuffle_documents: bool = True
    seed: int = 1234
    skip_blocks: int = field(default=0, metadata=_min(0))
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
    max_length: int = field(default=256, metadata=_min(4))
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
    block_fraction: float = field(default=0.5, metadata=_within(0, 1))
    clean_attention: str = field(default="causal", metadata=_choices("causal", "block"))
    ar_weight: float = field(default=0.0, metadata=_min(0))
    distill_weight: float = field(default=0.0, metadata=_min(0))
    draft_loss: str = field(default="ce", metadata=_choices("ce", "kd", "accept", "kd+accept"))
    reach: bool = False
    full_mask: float = field(default=0.0, metadata=_within(0, 1))
    accept_temperature: float = field(default=1.0, metadata=_within(0, 10, "(]"))
    anneal_steps: int = field(default=0, metadata=_min(0, "0 = no annealing"))
    weighting: str = field(default="inverse_t", metadata=_choices("inverse_t", "none"))
    eps: float = field(default=1e-3, metadata=_within(0, 1, "()"))


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr` at max_steps (or constant).

    lr, weight_decay, beta1, beta2, adam_eps: AdamW. grad_clip: max global grad norm (0 = off).
    warmup_steps: linear warmup from 0. schedule: cosine / constant. min_lr_ratio: cosine floor.
    """

    lr: float = field(default=3e-4, metadata=_min(0, strict=True))
    weight_decay: float = field(default=0.1, metadata=_min(0))
    beta1: float = field(default=0.9, metadata=_within(0, 1, "[)"))
    beta2: float = field(default=0.95, metadata=_within(0, 1, "[)"))
    adam_eps: float = field(default=1e-8, metadata=_min(0, strict=True))
    grad_clip: float = field(default=1.0, metadata=_min(0, "0 = off"))
    warmup_steps: int = field(default=100, metadata=_min(0))
    schedule: str = field(default="cosine", metadata=_choices("cosine", "constant"))
    min_lr_ratio: float = field(default=0.1, metadata=_within(0, 1))


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
    max_steps: int = field(default=1000, metadata=_min(1))
    max_minutes: float = field(default=0.0, metadata=_min(0, "0 = no limit"))
    batch_size: int = field(default=8, metadata=_min(1))
    grad_accum: int = field(default=1, metadata=_min(1))
    mixed_precision: str = field(default="no", metadata=_choices("no", "bf16", "fp16", "auto"))
    gradient_checkpointing: bool = False
    compile: bool = False
    save_every: int = field(default=500, metadata=_min(0))
    keep_last: int = field(default=3, metadata=_min(1))
    resume: str = ""
    eval_every: int = field(default=500, metadata=_min(0))
    eval_batches: int = field(default=4, metadata=_min(0))
    eval_batch_size: int = field(default=8, metadata=_min(1))
    eval_mask_ratios: list = field(default_factory=lambda: [0.15, 0.5, 0.9])
    eval_elbo_samples: int = field(default=4, metadata=_min(0))
    eval_block_length: int = field(default=0, metadata=_min(0, "0 = auto"))
    log_every: int = field(default=10, metadata=_min(1))
    progress: bool = True
    seed: int = 0
    threads: int = field(default=0, metadata=_min(0))
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
