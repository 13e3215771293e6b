"""Moved to nanocolor.fast.parallel (the fast engine's worker pool); this name keeps old imports working."""
from .fast.parallel import (blas_single_threaded, enable, keep_large_arrays_in_heap, run,  # noqa: F401
                            set_workers, slot, split, workers)
