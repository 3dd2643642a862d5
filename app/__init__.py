"""The Gradio playground: `ui` assembles the tabs (`tabs/`, one file each) and the named API (`api`); both call
`backend.Backend`, the one road to a model, composed of `requests` (checking), `worker` (runs, cancellation,
limits), `models` (load / switch / free) and `experiments` (race, sweeps, scoreboard); `render` draws; `examples`
holds the shipped few-shot prompts."""

# What one request may cost, by default (app.py --max-prompt-tokens / --time-limit; ui.build(...) arguments). On a
# CPU a forward over ~1k tokens takes well under a second for the 135M default, so 1024 prompt tokens keep a request
# to seconds; the time limit catches everything else (long lengths x many steps). Here, not in app.backend, so the
# launcher's --help does not import torch.
MAX_PROMPT_TOKENS = 1024
MAX_NEW_TOKENS = 512  # tokens one request may generate or fill (--max-new-tokens): the UI's slider range
TIME_LIMIT_S = 120.0
MAX_SESSIONS = 1000  # sessions whose state is kept (--max-sessions); least recently used beyond it dropped
