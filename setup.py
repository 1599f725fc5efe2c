"""What pyproject.toml cannot say: the repository's top-level bpf/ ships inside the package, as kpr/bpf/.

The BPF sources stay where C tools and readers expect them (bpf/ at the top); a wheel carries them as package data of
`kpr.bpf`, which kpr.datapath.toolchain.bpf_sources() finds with importlib.resources. A checkout or an editable
install finds the repository's bpf/ directly. The package-data patterns are in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["kpr", "kpr.*"]), "kpr.bpf"],
    package_dir={"kpr.bpf": "bpf"},
)
