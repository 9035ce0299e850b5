"""pamconf: does the module surely run in a service's session phase? (pure parser and the
reachability rule; the file reader on a tmp dir owned by root)."""
import os

import pytest

from pam_callerid.pamconf import PamConfError, SessionStacks, session_reaches

COMMON = ("session\t[default=1]\t\t\tpam_permit.so\nsession\trequisite\t\t\tpam_deny.so\n"
          "session\trequired\t\t\tpam_permit.so\nsession required\tpam_unix.so \n")


def reads(files):
    def read(name):
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]
    return read


@pytest.mark.parametrize("sshd,want", [
    ("@include common-session\nsession required /x/pam_callerid.so a=1\n", True),
    ("session include common-session\n-session optional pam_callerid.so\n", True),
    ("session substack common-session\nsession [default=bad] pam_callerid.so\n", True),
    ("account required pam_callerid.so\n", False),                      # account only
    ("session sufficient pam_permit.so\nsession required pam_callerid.so\n", False),
    ("session [success=done default=ignore] pam_x.so\nsession required pam_callerid.so\n",
     False),
    ("session [default=2] pam_permit.so\nsession required pam_deny.so\n"
     "session required pam_callerid.so\n", False),                     # jumps over it
    ("session [success=ok default=die] pam_selinux.so open\n"
     "session requisite pam_x.so\nsession required pam_callerid.so\n", True),   # failures end it
    ("session required pam_x.so \\\n  arg\nsession required pam_callerid.so # ours\n", True),
    ("# session required pam_callerid.so\n", False),
])
def test_session_reaches(sshd, want):
    assert session_reaches("sshd", reads({"sshd": sshd, "common-session": COMMON})) is want


@pytest.mark.parametrize("text", ["session [default=1 pam_x.so\n", "session required\n",
                                  "session maybe pam_callerid.so\n", "@include sshd\n"])
def test_what_it_cannot_follow_raises(text):
    with pytest.raises(PamConfError):
        session_reaches("sshd", reads({"sshd": text}))


def test_missing_include_raises():
    with pytest.raises(FileNotFoundError):
        session_reaches("sshd", reads({"sshd": "@include nowhere\n"}))


@pytest.mark.root
def test_session_stacks_reads_and_notices_changes(tmp_path):
    d = tmp_path / "pam.d"
    d.mkdir()
    (d / "common-session").write_text(COMMON)
    f = d / "sshd"
    f.write_text("@include common-session\nsession required pam_callerid.so\n")
    st = SessionStacks(str(d))
    assert st.reaches("sshd") is True
    f.write_text("@include common-session\n")
    assert st.reaches("sshd") is False                # the change is seen
    assert st.reaches("nosuchservice") is False        # unreadable: no
    (d / "other").write_text("@include /etc/passwd\nsession required pam_callerid.so\n")
    assert st.reaches("other") is False                # outside the PAM directory
    os.symlink(f, d / "link")
    assert st.reaches("link") is False                 # no symlinks
    os.chown(f, 65534, 65534)
    assert st.reaches("sshd") is False                 # not root's
