"""The model side of training: build the DiffusionLM (pretrained, random `init`, or from scratch), add LoRA,
wrap the objective in one `nn.Module` that accelerate can distribute, and export the result for `dlm.load`.

`Objective.forward` is the only thing the training loop calls on the (possibly DDP / FSDP / DeepSpeed-wrapped)
model: the wrappers hook `forward`, so the loss must be computed inside it, not by calling
`model.diffusion_loss` on the unwrapped module.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import dlm
from dlm import model_registry
from dlm.fileio import atomic_directory, cache_dir
from dlm.loading import load_tokenizer
from dlm.losses import needs_verifier

from .config import ConfigError

log = logging.getLogger(__name__)


# ----- tokenizers for random-init models -----------------------------------------------------------------------------
def load_tokenizer_cached(source: str):
    """A tokenizer from a registry name / HF dir / .gguf. Tokenizers inside a GGUF take ~10 s to extract, so the
    extracted one is cached under `<cache>/tokenizers/<hash of the gguf>`."""
    from transformers import AutoTokenizer
    gguf: Optional[Path] = None
    if model_registry.is_registered(source):
        spec = model_registry.get(source)
        if spec.origin[0] != "gguf":
            return dlm.load_tokenizer(source)
        gguf = spec.local_path()
    elif source.endswith(".gguf"):
        gguf = Path(source)
    if gguf is None:
        return load_tokenizer(Path(source))
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    directory = cache_dir() / "tokenizers" / key
    if (directory / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(directory)
        except Exception:  # a damaged cache entry: rebuild it
            shutil.rmtree(directory, ignore_errors=True)
    tok = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    with atomic_directory(directory, keep_existing=True) as tmp:
        tok.save_pretrained(tmp)
    return tok


def train_bpe_tokenizer(vocab_size: int, data_cfg):
    """A byte-level BPE with `vocab_size` tokens learned from the run's own training text (`model.tokenizer:
    bpe:N`): tiny models then spend their compute on the network, not on a 49k-row output layer.
    Deterministic for the same text. Special tokens: <|endoftext|> (EOS, id 0) and <|mask|> (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .documents import CLEANERS, expand_sources
    clean = CLEANERS[data_cfg.clean]
    files = [f for f in expand_sources(list(data_cfg.sources)) if not f.startswith("hf:")]
    if not files:
        raise ConfigError("model.tokenizer: bpe:N learns from local data.sources files; none are given")
    texts = [clean(doc) for f in files for doc in _bpe_texts(f, data_cfg.text_field)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", model_registry.NEW_MASK_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   mask_token=model_registry.NEW_MASK_TOKEN)


def _bpe_texts(path: str, text_field: str):
    """Documents to learn a BPE from: a text file whole; a JSONL record's text field, else all its strings
    (SFT records such as GSM8K's question/answer)."""
    from .documents import _open_text, iter_documents
    if ".jsonl" not in Path(path).name:
        yield from iter_documents(path, text_field)
        return
    import json
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if text_field in record:
                    yield str(record[text_field])
                else:
                    yield "\n".join(str(v) for v in record.values() if isinstance(v, str))


def _init_tokenizer(spec: str, data_cfg):
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            size = 0
        if size < 260:
            raise ConfigError(f"model.tokenizer: {spec!r}: write bpe:N with N >= 260 (256 bytes + specials)")
        return train_bpe_tokenizer(size, data_cfg)
    return load_tokenizer_cached(spec)


def materialize_random_model(model_cfg, directory: Path, seed: int, data_cfg=None) -> Path:
    """Build the random model described by `model.init` (+ its tokenizer, with a `<|mask|>` token added) and save
    it to `directory`, once: the same seed and init give bit-identical weights, so reruns and resumes agree."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    tok = _init_tokenizer(model_cfg.tokenizer, data_cfg)
    if tok.mask_token_id is None:
        tok.add_special_tokens({"mask_token": model_registry.NEW_MASK_TOKEN})
    init = dict(model_cfg.init)
    model_type = init.pop("model_type")
    init.setdefault("vocab_size", len(tok))
    init.setdefault("bos_token_id", tok.bos_token_id)
    init.setdefault("eos_token_id", tok.eos_token_id)
    try:
        config = AutoConfig.for_model(model_type, **init)
    except Exception as e:
        raise ConfigError(f"model.init: transformers cannot build a {model_type!r} config from it: {e}") from None
    if config.vocab_size < len(tok):
        raise ConfigError(f"model.init: vocab_size {config.vocab_size} < tokenizer size {len(tok)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return directory


# ----- building ------------------------------------------------------------------------------------------------------
def build_model(cfg, init_dir: Path) -> "dlm.DiffusionLM":
    """The DiffusionLM to train, on CPU in `model.dtype` (accelerate moves it to the device).

    Callers building a random `init` model on several ranks must do it inside `main_process_first()`.
    """
    mc = cfg.model
    source = str(materialize_random_model(mc, init_dir, cfg.run.seed, cfg.data)) if mc.init else mc.source
    torch.manual_seed(cfg.run.seed)  # a newly added mask row is drawn from the global RNG (mean resizing)
    model = dlm.load(source, mask_token_id=mc.mask_token_id, device="cpu", dtype=mc.dtype, quantization=None,
                     attn_implementation=mc.attn_implementation, shift=mc.shift, draft_adapter=False)
    model.source = source
    if mc.from_scratch:
        from transformers import AutoModelForCausalLM
        torch.manual_seed(cfg.run.seed)
        fresh = AutoModelForCausalLM.from_config(model.base.config).to(model.dtype)
        model.base = fresh
        log.info("model.from_scratch: weights re-initialised (architecture of %s kept)", source)
    # an AR-objective run (the baseline) leaves a causal LM: loaded later, it must default to the AR side
    model.config.adapted = cfg.diffusion.objective != "ar" or bool(model.config.adapted)
    model.config.clean_attention = cfg.diffusion.clean_attention  # how block steps train (and decoders decode)
    if cfg.run.gradient_checkpointing:
        model.base.config.use_cache = False
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        add_lora(model, cfg.lora)
        if cfg.lora.row_gate:   # a draft adapter: only the noisy rows of block forwards see it
            from dlm.adapter_routing import ANY_ORDER, AdapterRouting
            model.routing = AdapterRouting(model.base, gated=ANY_ORDER)
            model.config.row_gated = True
    if cfg.run.compile:
        model.base.compile()  # in place: parameter names (and checkpoints) stay the same
    return model


def add_lora(model, lora_cfg) -> None:
    """Wrap `model.base` with peft LoRA; the [MASK] embedding row (and `trainable_token_ids`) stay trainable."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise RuntimeError("lora.enabled needs peft: pip install peft") from None
    if lora_cfg.init_from:
        path = Path(lora_cfg.init_from)
        if model_registry.is_registered(lora_cfg.init_from):
            try:
                path = model_registry.get(lora_cfg.init_from).local_path()
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"lora.init_from: {e}") from None
        if lora_cfg.row_gate and (path / "dlm_config.json").is_file():   # a draft adapter continues its own
            draft = json.loads((path / "dlm_config.json").read_text()).get("draft_adapter")
            path = path / draft if draft else path
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"lora.init_from: {lora_cfg.init_from!r} is not a LoRA adapter directory "
                              "(no adapter_config.json)")
        model.base = PeftModel.from_pretrained(model.base, str(path), is_trainable=True)
        log.info("lora.init_from: continuing the adapter in %s", path)
        return
    targets = lora_cfg.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    tokens = sorted(set(int(t) for t in lora_cfg.trainable_token_ids)
                    | ({int(model.mask_token_id)} if lora_cfg.train_mask_row else set()))
    embed_saved = any("embed" in m or m in ("wte",) for m in lora_cfg.modules_to_save)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=target, modules_to_save=list(lora_cfg.modules_to_save) or None,
                        trainable_token_indices=(tokens or None) if not embed_saved else None,
                        task_type="CAUSAL_LM")
    try:
        model.base = get_peft_model(model.base, config)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{train / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({100 * train / max(total, 1):.2f}%)"


# ----- the objective as one module ------------------------------------------------------------------------------------
class Objective(nn.Module):
    """forward(batch) -> (loss, masked_ce) for the configured objective.

    diffusion, attention "full":   `DiffusionLM.diffusion_loss` (Eq. 7) with the step's annealing ratio.
    diffusion, attention "blocks": `DiffusionLM.block_diffusion_loss` (the [x_t; x_0] staircase) with the step's
                                   block length; the loop picks the mode per step for a "mixture".
    ar:        plain next-token cross-entropy with the base model's causal attention (baseline / benchmark);
               `masked_ce` is then the same CE.
    distill_weight > 0 (block steps, LoRA): the frozen base is the teacher: one forward without gradients with
    the adapter disabled gives its next-token logits, which the block loss distils (`block_diffusion_loss`).
    """

    def __init__(self, model, objective: str = "diffusion", weighting: str = "inverse_t", eps: float = 1e-3,
                 ar_weight: float = 0.0, distill_weight: float = 0.0, draft: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.objective, self.weighting, self.eps, self.ar_weight = objective, weighting, eps, ar_weight
        self.distill_weight = distill_weight
        self.draft = dict(draft or {})   # block steps: draft_loss / reach / full_mask / accept_temperature

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The frozen base's next-token logits (the adapter disabled; the mask id gets no mass)."""
        base = self.model.base
        if not hasattr(base, "disable_adapter"):
            raise ValueError("diffusion.distill_weight: the teacher is the frozen base, which needs a LoRA model")
        with torch.no_grad(), base.disable_adapter():
            return self.model.ar_logits(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, maskable: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, attention_mask_ratio: float = 1.0,
                generator: Optional[torch.Generator] = None, block_length: Optional[int] = None):
        if self.objective == "ar":
            logits = self.model.base(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, L, V]
            targets = input_ids[:, 1:]
            keep = maskable[:, 1:] if maskable is not None else torch.ones_like(targets, dtype=torch.bool)
            if attention_mask is not None:
                keep = keep & attention_mask[:, 1:].bool()
            ce = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])
            return ce, ce.detach()
        if block_length is not None:
            verifier_needed = needs_verifier(self.draft.get("draft_loss", "ce"), self.draft.get("reach", False)) \
                and getattr(self.model, "routing", None) is None   # else the clean rows are the base already
            teacher = (self.teacher_logits(input_ids, attention_mask)
                       if self.distill_weight > 0 or verifier_needed else None)
            out = self.model.block_diffusion_loss(input_ids, block_length, maskable=maskable,
                                                  attention_mask=attention_mask, weighting=self.weighting,
                                                  eps=self.eps, generator=generator, ar_weight=self.ar_weight,
                                                  teacher_logits=teacher, distill_weight=self.distill_weight,
                                                  **self.draft)
        else:
            out = self.model.diffusion_loss(input_ids, maskable=maskable, attention_mask=attention_mask,
                                            attention_mask_ratio=attention_mask_ratio, weighting=self.weighting,
                                            eps=self.eps, generator=generator)
        return out.loss, out.masked_ce


# ----- export --------------------------------------------------------------------------------------------------------
def export(model, directory: Path, base_model: Optional[str], training_info: dict,
           state_dict: Optional[dict] = None) -> Path:
    """Write the trained model so that `dlm.load(directory)` (and the app) accept it.

    Full training: safetensors weights + tokenizer + dlm_config.json (via `DiffusionLM.save_pretrained`).
    LoRA: the peft adapter (LoRA matrices + the trained [MASK] row) + tokenizer + dlm_config.json whose
    `base_model` names the base weights, so `dlm.load(directory)` == `dlm.load(base_model, adapter=directory)`.
    `state_dict`: a gathered full state dict (ZeRO-3 / FSDP, keys relative to `model.base`); then the weights are
    written from it instead of from the (sharded) live parameters.
    """
    model.config.training = dict(training_info)
    model.config.draft_adapter = None   # an export holds one adapter (a draft one says row_gated)
    if training_info.get("objective", "diffusion") != "ar":
        model.config.adapted = True
    is_peft = hasattr(model.base, "peft_config")
    if state_dict is None:
        model.save_pretrained(directory, base_model=base_model if is_peft else None)
        return directory
    from dlm.dlm_config import DLMConfig
    cfg = DLMConfig(**model.config.__dict__)
    if is_peft:
        cfg.base_model = base_model
    with atomic_directory(directory) as tmp:
        model.base.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        model.tokenizer.save_pretrained(str(tmp))
        cfg.save(tmp)
    return Path(directory)
