"""cgroups: Slurm's cgroup layouts (v1 and v2), job discovery on this node, and adoption.

Owns: parsing slurm.conf / cgroup.conf for the layout, listing a user's jobs from the extern
stepd sockets + cgroup tree, pid -> job from /proc/PID/cgroup, moving a pid into a job's
extern step. Imports: the standard library only (no other package of this project).
"""
