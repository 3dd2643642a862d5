"""Text forms of training and evaluation records that training and evaluation share (pure Python, no torch):
the same rewrite turns a GSM8K solution into the target `dlm-train` fine-tunes on (`sft.record_format`) and into
the shots and oracle lengths `dlm-eval` scores with, so both read it from here."""
from __future__ import annotations

import re

_EQUATION = re.compile(r"<<([^<>]*)>>")


def gsm8k_symbolic(solution: str) -> str:
    """A GSM8K solution in the symbolic form the paper fine-tunes on: only its `<<...>>` calculator equations,
    then `#### answer` ("Natalia sold 48/2 = <<48/2=24>>24 clips ... #### 72" -> "<<48/2=24>> <<48+24=72>> ####
    72"). Short targets a small model can learn; a solution without equations becomes "#### answer"."""
    equations = " ".join(f"<<{e.strip()}>>" for e in _EQUATION.findall(solution))
    answer = solution.split("####")[-1].strip()
    return f"{equations} #### {answer}" if equations else f"#### {answer}"


GSM8K_FORMATS = {"full": lambda solution: solution, "symbolic": gsm8k_symbolic}
