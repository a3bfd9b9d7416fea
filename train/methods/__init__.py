"""One trainer module per method. Importing this package imports each module, and each registers itself with
`ovseg.train.registry.register_trainer`: a new trainer is a new module here and nothing else is edited."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
