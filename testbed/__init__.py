"""testbed: the real Slurm mini-cluster in network namespaces (cluster.py) and the adoption
modules it can run (adopters.py: pam_slurm_adopt and ours, the same scenarios for both).

Its own home so that product code (the demo), tests and benchmarks may all import it.
Imports: the project's packages (to install our module into a cluster); never imported by
cgroups/, daemon/ or the login path.
"""
