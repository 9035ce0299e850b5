"""slurm-callerid: authenticated caller-ID ssh adoption for Slurm compute nodes.

For development and the test suite it is installed into the project's own virtual environment
(built from Debian's /usr/bin/python3; see packaging/run); sites install the Debian package
(packaging/deb), which keeps the code in /usr/lib/slurm-callerid. Never into the system
site-packages: the package names `daemon` and `cgroups` are generic and would clash.
"""
import re
from pathlib import Path

from setuptools import setup

# the one definition of the version: daemon/version.py
VERSION = re.search(r'^VERSION = "([^"]+)"', (Path(__file__).parent / "daemon" / "version.py").read_text(), re.M)[1]

setup(
    name="slurm-callerid",
    version=VERSION,
    license="MIT",
    description="Adopt ssh sessions into Slurm jobs via an authenticated caller-ID daemon",
    python_requires=">=3.11",
    packages=["pam_callerid", "daemon", "cgroups"],
    package_data={"pam_callerid": ["pam_callerid.c"]},     # the PAM module's source
    # pyroute2: only with SockDiag=pyroute2; cffi: libmunge; prometheus-client: metrics
    install_requires=["pyroute2>=0.7", "cffi>=1.15", "prometheus-client>=0.16"],
    # psutil: the lookup benchmark's comparison only
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "psutil>=5.9"]},
    entry_points={"console_scripts": ["callerid = pam_callerid.cli:main"]},
)
