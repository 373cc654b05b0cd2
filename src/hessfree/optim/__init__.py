"""hessfree.optim: second-order training as optax transformations.

Needs optax (``pip install "hessfree[optim]"``); the rest of hessfree does not.
"""

try:
    import optax as _optax  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    msg = 'hessfree.optim needs optax: pip install "hessfree[optim]" (or pip install optax)'
    raise ImportError(msg) from err

from ._hessian_free import HessianFreeState as HessianFreeState
from ._hessian_free import hessian_free as hessian_free

__all__ = ["HessianFreeState", "hessian_free"]
