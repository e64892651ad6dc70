"""Package discovery for the vlcache-sglang layout (metadata lives in pyproject.toml).

`kernels/` and `tuning/` are repository-root folders mapped into the `vlcache_sglang`
namespace, so that nothing named `kernels` or `tuning` lands at the top of site-packages.
"""
from setuptools import find_packages, setup

MAPPED = {"vlcache_sglang.kernels": "kernels", "vlcache_sglang.tuning": "tuning"}

packages = find_packages(include=["vlcache_sglang", "vlcache_sglang.*"])
package_dir = {"vlcache_sglang": "vlcache_sglang"}
for name, folder in MAPPED.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
