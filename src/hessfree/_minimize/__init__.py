"""Newton-CG minimization: one loop (``_solver``), two strategies (``_trust``, ``_newton``),
the automatic Jacobi preconditioner (``_jacobi``)."""

from ._proposal import MinimizeState as MinimizeState
from ._solver import Minimizer as Minimizer
from ._solver import minimize as minimize
