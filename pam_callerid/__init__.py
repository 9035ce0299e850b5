"""pam_callerid: the PAM module (C shim + embedded Python) and its policy, audit and demo.

Owns: the shim build, option parsing (pam_slurm_adopt-compatible), the account-phase decision,
session-phase adoption, audit records. Imports: cgroups, daemon (client side only).
"""
