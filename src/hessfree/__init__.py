"""hessfree: matrix-free curvature for JAX.

Hessian-vector products on any pytree, Gauss-Newton and Fisher operators, Newton-CG solvers,
spectra, traces and diagonals, never forming the d×d matrix. Public names only; the code lives
in private modules. Every public function compiles once per user function, settings and
shapes: calling it again at new parameter values compiles nothing.
"""

from ._batches import over_batches as over_batches
from ._blocks import block_diagonal as block_diagonal
from ._blocks import blocks as blocks
from ._blocks import layer_masks as layer_masks
from ._cg import cg as cg
from ._cost import ModeCost as ModeCost
from ._cost import cost as cost
from ._cost import select_mode as select_mode
from ._density import spectral_density as spectral_density
from ._diagonals import fisher_diagonal as fisher_diagonal
from ._diagonals import ggn_diagonal as ggn_diagonal
from ._eigsh import eigsh as eigsh
from ._estimators import diagonal as diagonal
from ._estimators import trace as trace
from ._influence import InfluenceScores as InfluenceScores
from ._influence import influence as influence
from ._influence import predicted_loss_change as predicted_loss_change
from ._influence import self_influence as self_influence
from ._krylov import lanczos as lanczos
from ._laplace import Laplace as Laplace
from ._laplace import Predictive as Predictive
from ._laplace import laplace as laplace
from ._minimize import Minimizer as Minimizer
from ._minimize import MinimizeState as MinimizeState
from ._minimize import minimize as minimize
from ._model_curvature import fisher as fisher
from ._model_curvature import ggn as ggn
from ._operators import CurvatureOperator as CurvatureOperator
from ._operators import hessian as hessian
from ._per_example import per_example_grad_norms as per_example_grad_norms
from ._per_example import per_example_vhv as per_example_vhv
from ._products import hvp as hvp
from ._products import hvp_fn as hvp_fn
from ._products import hvps as hvps
from ._results import STATUS_MESSAGES as STATUS_MESSAGES
from ._results import CGResult as CGResult
from ._results import DensityResult as DensityResult
from ._results import DiagonalEstimate as DiagonalEstimate
from ._results import EigshResult as EigshResult
from ._results import LanczosResult as LanczosResult
from ._results import OptimizeResult as OptimizeResult
from ._results import TraceEstimate as TraceEstimate
from ._seed import hvp_grad_of_grad as hvp_grad_of_grad
from ._seed import hvp_jvp_of_grad as hvp_jvp_of_grad

__version__ = "0.2.0"

__all__ = [  # noqa: RUF022  (grouped by layer, as the README lists them)
    # seed
    "hvp_grad_of_grad",
    "hvp_jvp_of_grad",
    # products
    "ModeCost",
    "cost",
    "hvp",
    "hvp_fn",
    "hvps",
    "select_mode",
    # operators
    "CurvatureOperator",
    "block_diagonal",
    "blocks",
    "fisher",
    "fisher_diagonal",
    "ggn",
    "ggn_diagonal",
    "hessian",
    "layer_masks",
    "over_batches",
    # results and the shared status table
    "STATUS_MESSAGES",
    "CGResult",
    "DensityResult",
    "DiagonalEstimate",
    "EigshResult",
    "LanczosResult",
    "OptimizeResult",
    "TraceEstimate",
    # solvers
    "MinimizeState",
    "Minimizer",
    "cg",
    "minimize",
    # analysis
    "diagonal",
    "eigsh",
    "lanczos",
    "per_example_grad_norms",
    "per_example_vhv",
    "spectral_density",
    "trace",
    # workflows
    "InfluenceScores",
    "Laplace",
    "Predictive",
    "influence",
    "laplace",
    "predicted_loss_change",
    "self_influence",
]
