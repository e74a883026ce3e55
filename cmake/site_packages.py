# cmake/site_packages.py: prints the Python site-packages folders, one a line, for cmake/cudnn.cmake
# (pip's nvidia-cudnn-frontend puts its headers in <site>/include, nvidia-cudnn-cu13 and torch's
# cuDNN live in <site>/nvidia/cudnn). Imports nothing heavy.
import importlib.util
import os
import site
import sysconfig

dirs = [sysconfig.get_paths().get(k) for k in ("platlib", "purelib")]
try:
    dirs += site.getsitepackages()
except Exception:
    pass
try:
    dirs.append(site.getusersitepackages())
except Exception:
    pass
try:  # nvidia.cudnn wherever Python finds it (a venv's torch, PYTHONPATH)
    spec = importlib.util.find_spec("nvidia.cudnn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(loc))))
except Exception:
    pass
seen = set()
for d in dirs:
    if d and os.path.isdir(d) and d not in seen:
        seen.add(d)
        print(d)
