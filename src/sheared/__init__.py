"""sheared: structured pruning and continued pretraining of LLaMA-family models.

Importing the package does nothing; the pieces live in the subpackages
(`sheared.model`, `sheared.pruning`, `sheared.data`, `sheared.train`, `sheared.export`,
`sheared.eval`) and the command line in `sheared.cli`.
"""

__version__ = "0.1.0"
