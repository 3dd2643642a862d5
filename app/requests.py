"""Old name of `app.checks` (request checking), kept while files being edited elsewhere still import it: the same
module object. Import `app.checks` (this name shadowed the `requests` package in readers' minds)."""
import sys

from app import checks

sys.modules[__name__] = checks
