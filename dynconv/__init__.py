__version__ = "0.2.0"  # the package version (pyproject.toml's `version`, CHANGELOG.md)

from .decisions import ChannelDecision, Decision, Dynamic, SpatialDecision, StaticDecision, UnitCost  # noqa: F401
from .flops import MacCounter, count_mmac, count_parameters  # noqa: F401
from .gates import Gate, set_gate_schedule  # noqa: F401
from .loss import SparsityCriterion, budget_bounds  # noqa: F401
from .maskunit import MaskUnit, dilate_mask  # noqa: F401
