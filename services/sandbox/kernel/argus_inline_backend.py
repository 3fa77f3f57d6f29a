"""matplotlib backend for sandbox kernels, used the way Jupyter's inline backend is.

`plt.show()` hands every open figure to the kernel as PNG and closes it. Selected through
MPLBACKEND=module://argus_inline_backend, so matplotlib is imported only when user code needs it.
"""

import builtins

from matplotlib.backend_bases import FigureManagerBase as FigureManager  # noqa: F401
from matplotlib.backends.backend_agg import FigureCanvasAgg as FigureCanvas  # noqa: F401


def show(*args: object, **kwargs: object) -> None:
    builtins.__argus_show__()  # type: ignore[attr-defined]
