"""Old name of `evals.eval_model` (a model evaluated as an AR LM or a DLM), kept while files being edited elsewhere
still import it: the same module object. Import `evals.eval_model`."""
import sys

from evals import eval_model

sys.modules[__name__] = eval_model
