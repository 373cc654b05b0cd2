"""hessfree: matrix-free curvature for JAX.

Hessian-vector products on any pytree, Gauss-Newton and Fisher operators, Newton-CG solvers,
spectra, traces and diagonals, never forming the d×d matrix. Public names only; the code lives
in private modules.
"""

from ._cost import cost as cost
from ._cost import select_mode as select_mode
from ._operators import CurvatureOperator as CurvatureOperator
from ._operators import fisher as fisher
from ._operators import ggn as ggn
from ._operators import hessian as hessian
from ._products import hvp as hvp
from ._products import hvp_fn as hvp_fn
from ._products import hvps as hvps
from ._seed import hvp_grad_of_grad as hvp_grad_of_grad
from ._seed import hvp_jvp_of_grad as hvp_jvp_of_grad

__version__ = "0.1.0"
