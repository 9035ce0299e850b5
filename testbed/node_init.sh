#!/bin/sh
# First process of a test-bed host, already inside its own network namespace and a fresh
# UTS + mount namespace (private propagation: nothing here is seen by the root namespace).
# Gives the host its name and private copies of the few /etc files the test bed changes,
# a private /run and a private /dev with /dev/log bound to the host's syslog socket, then
# becomes the long-lived namespace holder that `nsenter -t HOLDER -n -u -m` targets.
# usage: node_init.sh NAME STATE_DIR [cgroup2]
# With "cgroup2" the host was started in its own cgroup2 subtree and cgroup namespace
# (testbed/cgroup2.py): a fresh cgroup2 mount makes that subtree the host's cgroup root.
set -eu
name=$1; st=$2; h=$st/hosts/$name
hostname "$name"
if [ "${3:-}" = cgroup2 ]; then
    umount /sys/fs/cgroup/unified       # mounting over it without this fails: "busy"
    mount -t cgroup2 cid-cg2 /sys/fs/cgroup/unified
fi
# /etc: an overlay whose upper layer holds this host's passwd/group/shadow/hosts, slurm/ and
# pam.d/sshd. (Bind-mounting single files is not enough: when a program in the root namespace
# replaces /etc/passwd by rename, the kernel detaches such a mount in every other namespace.)
mount -t overlay cid-etc -o "lowerdir=/etc,upperdir=$h/etc.upper,workdir=$h/etc.work" /etc
mount -t tmpfs -o mode=0755,size=16m cid-run /run
mkdir -p /run/sshd /run/lock
# private /dev: a small tmpfs re-exposing every entry of the real /dev, plus our own /dev/log
o=$h/dev.orig
mkdir -p "$o"
mount --rbind /dev "$o"
mount -t tmpfs -o mode=0755,size=1m,nosuid cid-dev /dev
for e in "$o"/* "$o"/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    b=${e##*/}
    case "$b" in log|ptmx|pts) continue ;; esac
    if [ -L "$e" ]; then cp -P "$e" "/dev/$b"
    elif [ -d "$e" ]; then mkdir "/dev/$b"; mount --rbind "$e" "/dev/$b"
    else : > "/dev/$b"; mount --bind "$e" "/dev/$b"
    fi
done
: > /dev/log
# a private devpts instance (ssh -t, sshpass): /dev/ptmx must resolve to its own pts/ptmx
mkdir /dev/pts
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 cid-pts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount --bind "$h/devlog.sock" /dev/log
umount -l "$o"
echo $$ > "$h/holder.pid"
exec sleep infinity
