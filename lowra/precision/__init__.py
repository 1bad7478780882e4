"""Per-output-channel precision assignment: the two-stage ILP of LowRA (CVXPY + HiGHS).

Problem (the "flat" problem).  Channel ``c`` (one output row of one quantized matrix) has
``n_c`` parameters (its in-features) and a squared error ``e[c, j]`` when stored with
``candidates[j]`` bits.  Choose one candidate per channel to

    minimize  sum_c e[c, j_c]
    s.t.      sum_c n_c * b(j_c) <= B * sum_c n_c             (budget, never exceeded)
              sum_c n_c * b(j_c) >= B * sum_c n_c - max_c n_c (budget used up to one channel)

per budget group (the whole model, or each matrix).  This is a multiple-choice knapsack with
1.36 M channels for Llama-2-7B.

Bit costs.  Optionally (``bit_costs``) channel ``c`` costs an arbitrary ``w[c, j]`` bits at
candidate ``j`` (positive integers, strictly increasing in ``j``), e.g. its code bits plus its
share of codebook, scales and row index, so that the budget counts *stored* bits per weight:

    sum_c w[c, j_c] <= B * sum_c n_c                         (B still per parameter)
    sum_c w[c, j_c] >= B * sum_c n_c - max_c max_j (w[c, j+1] - w[c, j])

The fill row's slack is one channel's largest cost step: upgrading one step at a time from
the cheapest plan crosses the budget in steps no larger, so the window is never empty.
Everything in the stages holds with ``n_c * b_j`` replaced by ``w[c, j]``: hull segments, the stage-1
budget rows, the prefix argument of stage 2, repair moves, the greedy baseline and the exact
ILP.  Without ``bit_costs``, ``w = n * cand`` and the plans are bit-identical to the planner
before costs existed (``bit_costs`` equal to ``n * cand`` is recognised as that default).

LowRA solves the problem in stages, one module each (read in this order):

* :mod:`~lowra.precision.problem`: input checking; exact integer budget rows per group;
* :mod:`~lowra.precision.bounds`: each channel's convex hull and the exact LP bound;
* :mod:`~lowra.precision.stage1`: 0. k-means clusters, 1. the integer program over clusters,
  whose cost model samples each cluster's efficiency path (:mod:`~lowra.precision.efficiency_paths`);
* :mod:`~lowra.precision.stage2`: 2. the exact assignment of channels within each cluster;
* :mod:`~lowra.precision.repair`: 3. the exact-integer budget check and local moves;
* :mod:`~lowra.precision.rounding`: 4. a second plan, the LP optimum rounded down and filled; the
  better of the two is returned (``info["plan_source"]``), so a plan is never further from the LP
  bound than one channel's step, whatever the clusters miss;
* :mod:`~lowra.precision.assign`: :func:`assign_precision`, which chains them, and
  :mod:`~lowra.precision.plan`: the :class:`PrecisionPlan` it returns.

Beside them: :mod:`~lowra.precision.baselines` (the exact flat ILP, the greedy, one uniform
width), :mod:`~lowra.precision.synthetic` (error tables shaped like Llama-2-7B's) and
:mod:`~lowra.precision.highs` (HiGHS through CVXPY).

Bits are counted as code bits per parameter (QLoRA/LoftQ convention): ``average_bits`` is
``sum_c n_c b_c / sum_c n_c``; with ``bit_costs`` the budget bounds ``average_cost_bits`` =
``sum_c w[c, j_c] / sum_c n_c`` instead, and both are reported.  Decision: a budget ``B`` is
read as the decimal the user wrote (``Fraction(str(B))``), so ``average_bits <= B`` (or
``average_cost_bits <= B``) holds exactly, also after float rounding.
"""

from lowra.precision.assign import assign_precision
from lowra.precision.baselines import exact_assignment, greedy_assignment, uniform_assignment
from lowra.precision.bounds import lp_lower_bound
from lowra.precision.plan import PrecisionPlan
from lowra.precision.synthetic import llama_layer_shapes, synthetic_error_table

__all__ = [
    "PrecisionPlan",
    "assign_precision",
    "lp_lower_bound",
    "exact_assignment",
    "greedy_assignment",
    "uniform_assignment",
    "synthetic_error_table",
    "llama_layer_shapes",
]
