"""zarrscope's built-in sample image: a synthetic multiscale two-channel OME-Zarr."""

import warnings

# ``python -m sample_data.make_sample`` imports this package, which imports the module
# below, before runpy executes it as __main__; runpy then warns that it is already
# imported. That is harmless here (the module has no import-time side effects).
warnings.filterwarnings(
    "ignore",
    message=r"'sample_data\.make_sample' found in sys\.modules",
    category=RuntimeWarning,
)

from .make_sample import default_sample_path, ensure_sample, make_sample  # noqa: E402

__all__ = ["default_sample_path", "ensure_sample", "make_sample"]
