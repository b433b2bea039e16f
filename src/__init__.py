"""The recipe's modules. Importing any of them first hides two warnings a user cannot act on, so every entry point
(train.py, tools/*.py) gets the filters before Lightning is imported."""
import re
import warnings

# lightning_fabric and pytorch_lightning 1.9.5 import pkg_resources in their __init__, which setuptools >= 81 reports
# as deprecated on every start; the fix is Lightning's, not the user's
warnings.filterwarnings("ignore", message=re.escape("pkg_resources is deprecated as an API"), category=UserWarning)
# src/data/dataset.py's JsonlStreamDataset gives each loader worker an exact share of the mini-epoch, so its __len__ is
# exact for any worker count (tests/test_stream.py); the length keeps Lightning's progress bar total and epoch end
warnings.filterwarnings("ignore", message=re.escape("Your `IterableDataset` has `__len__` defined."),
                        category=UserWarning)
