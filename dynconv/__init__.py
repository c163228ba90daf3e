from .flops import MacCounter, count_mmac, count_parameters  # noqa: F401
from .loss import SparsityCriterion, budget_bounds  # noqa: F401
from .maskunit import Mask, MaskUnit, dilate_mask, set_gumbel  # noqa: F401
