"""pam_callerid: the PAM module (a thin C client in sshd) and the PAM decision service that
runs inside ``callerid daemon`` (the sssd_pam / logind pattern: no interpreter in sshd).

    sshd --PAM--> pam_callerid.so (pam_callerid.c) --unix SOCK_SEQPACKET--> callerid daemon
                                                     (local protocol v1: wire.py)

Build and install the module (a C compiler and libpam's headers; see build.py)::

    python -m pam_callerid.build --install        # -> the system's PAM module directory

PAM lines (sshd's stack; the module decides in account and adopts [priv] in session; in
account only -- pam_slurm_adopt's documented placement -- it still adopts; on cgroup v1 a
single-threaded caller enters the job's cgroups itself; with the session line, the account
phase answers before its adoption is done and the session phase waits for it: login.py)::

    account  required  pam_callerid.so
    session  required  pam_callerid.so

Module arguments: pam_slurm_adopt's (action_no_jobs, action_unknown, action_adopt_failure,
action_generic_failure, disable_x11, ignore_root, join_container, log_level, nodename, service,
single_job_skip_rpc) with the same values and defaults, plus ours (rpc_timeout, port, config,
audit, messages / quiet, allow_groups, socket, daemon_timeout, action_unknown=user): see
options.py.

Modules: pam_callerid.c + build (the client), wire (the protocol), service (socket, peers,
workers), login (one login's decision: caches, caller-ID query, adoption, reply), settings
(callerid.conf, slurm.conf and the layout, cached until a file changes), peer (SO_PEERCRED,
pidfds, sshd's [priv]), options + policy (pure), audit (the one writer), audit_reader
(``callerid audit``), logsink (syslog), check (``callerid check``), cli (``callerid``),
pamconf (does the module run in a service's session phase?),
demo (the test bed demo).
"""
