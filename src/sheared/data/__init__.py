"""Data: the sample corpus, tokenize-and-pack, token files, the domain mixture sampler and
dynamic batch loading. Knows nothing of the model.

Public functions for users who script their own loops:
`update_domain_weights`, `fit_reference_losses`, `DomainMixtureSampler`, `rank_slice`.
"""

from sheared.data.dbl import fit_reference_losses, update_domain_weights
from sheared.data.sampler import DomainMixtureSampler, rank_slice

__all__ = ["DomainMixtureSampler", "fit_reference_losses", "rank_slice", "update_domain_weights"]
