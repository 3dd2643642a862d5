"""DLMConfig: what turns a causal LM into a DLM, saved as `dlm_config.json` beside the weights (torch-free)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

DLM_CONFIG_NAME = "dlm_config.json"


@dataclass
class DLMConfig:
    """What turns a causal LM into a DLM; saved as `dlm_config.json` next to the weights.

    mask_token_id:    id of [MASK] (absorbing state).
    shift:            hidden state i predicts token i+1 (True for DiffuGPT / DiffuLLaMA).
    base_family:      transformers model_type of the base (gpt2, llama, qwen2, ...).
    ar_counterpart:   registry name / path of the AR model to compare with (side-by-side, eval).
    adapted:          True when the weights were trained with the diffusion objective.
    added_mask_token: the mask token was added to the base vocabulary (its AR logit is suppressed).
    base_model:       for adapter-only saves: the registry name / path of the base weights.
    training:         free-form record of how the weights were made (recipe, tokens seen).
    clean_attention:  block diffusion: how clean (known) tokens attend to each other, as trained: "causal" (token
                      by token: every clean row is an AR predictor, which the speculative decoder uses to verify
                      drafts) or "block" (bidirectional inside a clean block).
    row_gated:        the (outermost) adapter is a draft adapter: in block forwards it runs on the noisy rows only,
                      so the clean rows (the verifier) are the base model exactly (`dlm.adapter_routing`).
    draft_adapter:    a subdirectory holding such a row-gated draft adapter for block forwards (writing), beside
                      the directory's own adapter, which then serves full attention (infilling, any order, scores).
    """

    mask_token_id: int
    shift: bool = True
    base_family: str = ""
    ar_counterpart: Optional[str] = None
    adapted: bool = False
    added_mask_token: bool = False
    base_model: Optional[str] = None
    training: dict = field(default_factory=dict)
    clean_attention: str = "causal"
    row_gated: bool = False
    draft_adapter: Optional[str] = None
    format_version: int = 1

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, DLM_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DLMConfig":
        path = Path(directory, DLM_CONFIG_NAME)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        if "mask_token_id" not in data:
            raise ValueError(f"{path} has no mask_token_id")
        return cls(**{k: v for k, v in data.items() if k in known})
