# nbval executes the notebooks in a kernel that inherits this process's environment:
# IN_TEST=1 makes every heavy cell take its small (CI) path, see `scfs.data.quick_mode`.
import os
os.environ.setdefault("IN_TEST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
