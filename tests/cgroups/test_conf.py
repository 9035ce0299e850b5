"""Pure and file-based tests of cgroups.conf (the slurm.conf-style parser)."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from cgroups.conf import Conf, ConfError, load_conf, parse_conf_lines, parse_conf_text
from cgroups.errors import CgroupError

MINI = """\
# minicluster
ClusterName=minicluster
SlurmctldHost=ctl(10.199.0.10)
SlurmdSpoolDir=/x/state/%n/spool   # trailing comment
ProctrackType=proctrack/cgroup
NodeName=node1 NodeAddr=10.199.0.1 CPUs=2 State=UNKNOWN
NodeName=node2 NodeAddr=10.199.0.2 CPUs=2
PartitionName=debug Nodes=node[1-3] Default=YES
"""


def test_flat_pairs_and_line_numbers():
    got = parse_conf_text(MINI, "slurm.conf")
    assert ("ClusterName", "minicluster", 2) in got
    assert ("SlurmdSpoolDir", "/x/state/%n/spool", 4) in got
    assert ("NodeName", "node1", 6) in got and ("NodeAddr", "10.199.0.1", 6) in got
    assert ("CPUs", "2", 7) in got
    assert all(len(t) == 3 for t in got)


def test_lines_group_pairs():
    lines = parse_conf_lines(MINI, "slurm.conf")
    nodes = [cl for cl in lines if cl.key.lower() == "nodename"]
    assert [cl.as_dict()["nodeaddr"] for cl in nodes] == ["10.199.0.1", "10.199.0.2"]
    assert nodes[0].lineno == 6 and nodes[0].filename == "slurm.conf"


def test_case_insensitive_last_wins():
    c = Conf(parse_conf_lines("cgroupplugin=cgroup/v1\nCGROUPPLUGIN=cgroup/v2\n", "c"), ["c"])
    assert c["CgroupPlugin"] == "cgroup/v2"
    assert c.get("cgroupPLUGIN") == "cgroup/v2"
    assert "CgroupPlugin" in c and "Nope" not in c
    assert c.where("CgroupPlugin") == ("c", 2)
    assert c.get("missing", "dflt") == "dflt"
    with pytest.raises(KeyError):
        c["missing"]


@pytest.mark.parametrize("text,expected", [
    ("A=1", [("A", "1", 1)]),
    ("  A = 1  ", [("A", "1", 1)]),
    ("A=", [("A", "", 1)]),
    ('A="x y # z" B=2', [("A", "x y # z", 1), ("B", "2", 1)]),
    ("A=x\\#y", [("A", "x#y", 1)]),
    ("A=1 \\\n  B=2\nC=3", [("A", "1", 1), ("B", "2", 1), ("C", "3", 3)]),
    ("\n\n# only comment\n   \nA=1\r\n", [("A", "1", 5)]),
    ("Include /etc/slurm/x.conf", [("Include", "/etc/slurm/x.conf", 1)]),
    ('include "/a b/c.conf"', [("Include", "/a b/c.conf", 1)]),
    ("A=1\tB=2", [("A", "1", 1), ("B", "2", 1)]),
    ("A= B=2", [("A", "", 1), ("B", "2", 1)]),
])
def test_variants(text, expected):
    assert parse_conf_text(text, "f") == expected


@pytest.mark.parametrize("text,lineno,fragment", [
    ("A=1\nthis is not\n", 2, "expected"),
    ("A=1\n=2\n", 2, "expected Key=Value"),
    ('A="unterminated\n', 1, "unterminated quote"),
    ('A="x"y\n', 1, "unexpected text"),
    ('A=x"y\n', 1, "stray quote"),
    ("A=1\nB\n", 2, "expected '='"),
    ("A\x00=1\n", 1, "NUL"),
    ("Include\n", 1, "expected '='"),
    ("A=1 junk\n", 1, "expected '='"),
])
def test_errors_name_file_and_line(text, lineno, fragment):
    with pytest.raises(ConfError) as ei:
        parse_conf_text(text, "/etc/slurm/cgroup.conf")
    e = ei.value
    assert e.filename == "/etc/slurm/cgroup.conf" and e.lineno == lineno
    assert str(e).startswith(f"/etc/slurm/cgroup.conf:{lineno}: ")
    assert fragment in str(e)
    assert isinstance(e, CgroupError) and isinstance(e, ValueError)


def test_huge_line_no_crash():
    text = "A=" + "x" * 2_000_000 + "\n" + "B=1\n" * 50_000
    got = parse_conf_text(text, "big")
    assert got[0][1] == "x" * 2_000_000 and len(got) == 50_001


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_hypothesis_garbage_only_conferror(text):
    try:
        out = parse_conf_text(text, "g")
    except ConfError as e:
        assert e.filename == "g" and (e.lineno is None or e.lineno >= 1)
    else:
        for k, v, n in out:
            assert isinstance(k, str) and k and isinstance(v, str) and n >= 1


_key = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k.lower() != "include")
_val = st.from_regex(r"[A-Za-z0-9/%._,:()\[\]-]{0,20}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(_key, _val), min_size=1, max_size=4), max_size=10))
def test_hypothesis_roundtrip(lines):
    text = "\n".join(" ".join(f"{k}={v}" for k, v in line) for line in lines)
    got = parse_conf_text(text, "r")
    want = [(k, v, i) for i, line in enumerate(lines, 1) for k, v in line]
    assert got == want


def test_load_conf_include_relative_glob_and_errors(tmp_path):
    (tmp_path / "nodes.d").mkdir()
    (tmp_path / "nodes.d" / "a.conf").write_text("NodeName=a1 NodeHostname=h1\n")
    (tmp_path / "nodes.d" / "b.conf").write_text("NodeName=b1\n")
    (tmp_path / "extra.conf").write_text("SlurmdSpoolDir=/spool/%n\n")
    main = tmp_path / "slurm.conf"
    main.write_text("ClusterName=c\nInclude extra.conf\nINCLUDE nodes.d/*.conf\nInclude none.d/*.conf\n")
    c = load_conf(main)
    assert c["slurmdspooldir"] == "/spool/%n"
    assert [cl.as_dict()["nodename"] for cl in c.lines("NodeName")] == ["a1", "b1"]
    assert c.where("SlurmdSpoolDir") == (str(tmp_path / "extra.conf"), 1)
    assert len(c.filenames) == 4

    main.write_text("A=1\nInclude missing.conf\n")
    with pytest.raises(ConfError) as ei:
        load_conf(main)
    assert ei.value.filename == str(main) and ei.value.lineno == 2 and "missing.conf" in str(ei.value)

    main.write_text("A=1\nInclude slurm.conf\n")
    with pytest.raises(ConfError, match="loop"):
        load_conf(main)

    (tmp_path / "bad.conf").write_text("X=1\nY=\"oops\n")
    main.write_text("Include bad.conf\n")
    with pytest.raises(ConfError) as ei:
        load_conf(main)
    assert ei.value.filename == str(tmp_path / "bad.conf") and ei.value.lineno == 2


def test_load_conf_file_errors(tmp_path):
    with pytest.raises(ConfError, match="does not exist"):
        load_conf(tmp_path / "nope.conf")
    with pytest.raises(ConfError, match="directory"):
        load_conf(tmp_path)
    big = tmp_path / "big.conf"
    big.write_bytes(b"A=1\n" * 100)
    with pytest.raises(ConfError, match="larger than"):
        load_conf(big, max_bytes=50)
    bad = tmp_path / "latin.conf"
    bad.write_bytes(b"A=1\nB=caf\xe9\n")
    with pytest.raises(ConfError) as ei:
        load_conf(bad)
    assert ei.value.lineno == 2 and "UTF-8" in str(ei.value)


def _strip_reference(line):
    """Character-by-character definition: a # outside double quotes starts a comment; \\# is #."""
    out, i, quoted = [], 0, False
    while i < len(line):
        c = line[i]
        if c == "\\" and line[i + 1:i + 2] == "#":
            out.append("#")
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            break
        out.append(c)
        i += 1
    return "".join(out)


@given(st.text(alphabet='ab =#"\\\t', max_size=40))
@settings(max_examples=2000)
def test_strip_comment_fast_path_matches_definition(line):
    from cgroups.conf import _strip_comment
    assert _strip_comment(line, "f", 1) == _strip_reference(line)


@pytest.mark.parametrize("value,want", [
    ("yes", True), ("TRUE", True), (" 1 ", True), ("on", True), ("Up", True),
    ("no", False), ("False", False), ("0", False), ("OFF", False), ("down", False),
    ("", None), ("y", None), ("yes please", None), ("2", None), (None, None), (1, None),
])
def test_parse_bool(value, want):
    from cgroups.conf import parse_bool
    assert parse_bool(value) is want


@pytest.mark.parametrize("value,want", [
    ("1", True), ("yes_please", True), ("truex", True), ("0", False), ("none", False),
    ("falsey", False), ("", None), ("maybe", None), ("10", True),
])
def test_parse_bool_prefix(value, want):
    """pam_slurm_adopt reads its module arguments by prefix (xstrncasecmp)."""
    from cgroups.conf import parse_bool
    assert parse_bool(value, prefix=True) is want
