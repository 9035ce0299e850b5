"""pam_callerid: the PAM module (C shim + embedded Python) and its policy, audit and demo.

Owns: the shim build, option parsing (pam_slurm_adopt-compatible), the account-phase decision,
session-phase adoption, audit records. Imports: cgroups, daemon (client side only).

Build and install the C client (gcc and libpam's headers only; see build.py)::

    python3 -m pam_callerid.build --out build/pam --install   # -> the dir holding pam_unix.so
    # --install-dir DIR installs elsewhere (tests use an absolute path in their PAM files)

On nodes, install the Debian package instead (`bash packaging/run deb`, docs/admin-guide.md).

PAM lines (sshd's stack; decide in account, adopt in session)::

    account  required  pam_callerid.so action_adopt_failure=deny action_generic_failure=deny
    session  required  pam_callerid.so action_adopt_failure=deny

Module arguments (prefix match, case-insensitive, as pam_slurm_adopt; see options.py):
action_no_jobs=deny|ignore, action_unknown=newest|allow|deny|user,
action_adopt_failure=allow|deny, action_generic_failure=ignore|allow|deny, disable_x11=0|1,
ignore_root=0|1, join_container=true|false, log_level=quiet..debug5, nodename=NAME,
service=NAME|*, single_job_skip_rpc=0|1; ours: rpc_timeout=SECONDS (1.0), port=N,
config=PATH (/etc/slurm/callerid.conf), audit=PATH|none, quiet, onerror=fail|ignore,
cgroup_warmup=0|1 (default 1; see pam_callerid/build.py).

Modules: build (the .so), options + policy (pure), hook (I/O edge called by the shim),
backend (adapters to cgroups/ and daemon/), audit (records + ``callerid audit`` reader).
"""
