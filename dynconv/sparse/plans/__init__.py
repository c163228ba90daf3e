"""Engine plans: how each block type runs sparsely. A plan is built once per block (folded weights, checks) and
run per input: `plan(x, target) -> (output, decision)`, the block's own contract. The engine (engine.py) knows
no block or model type: it runs the model's forward with every block that has a registered plan replaced by it.

A new block type registers its plan next to the block's definition: `register_plan(MyBlock, MyBlockPlan)`.
"""
from dataclasses import dataclass

_PLANS = {}  # block type -> plan type


def register_plan(block_type, plan_type):
    _PLANS[block_type] = plan_type


def plan_type_for(module):
    """The plan type registered for exactly this module's type, or None (subclasses need their own)."""
    return _PLANS.get(type(module))


@dataclass(frozen=True)
class EngineSettings:
    """When a block's gathered execution is worth it (see SparseEngine, which documents each; the defaults live
    here only). tile_path None: the device decides (the engine makes it True on CUDA, False on CPUs)."""

    dense_above: float = 0.9
    gather_overhead_macs: float = 20e6
    min_gather_width: int = 64
    tile_path: bool | None = None


class BlockPlan:
    """Base of the plans. `ops`: the op table of the engine's backend (dynconv/sparse/ops.py)."""

    def __init__(self, block, ops, settings):
        self.block, self.ops, self.settings = block, ops, settings
        self.executed_macs = None  # MACs of the block's conditional layers as executed in the last call, if known

    def __call__(self, x, target=None):
        raise NotImplementedError
