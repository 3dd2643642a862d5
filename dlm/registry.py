"""Old name of `dlm.model_registry` (the known models), kept while files being edited elsewhere still import it:
the same module object, so attributes and monkeypatches are shared. Import `dlm.model_registry`."""
import sys

from . import model_registry

sys.modules[__name__] = model_registry
