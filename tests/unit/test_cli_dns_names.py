"""--with-dns-names adds the dns_names family, and the options recorded in node.json and summary.json say so."""

from __future__ import annotations

from ktrace import cli, probes


def test_dns_names_is_off_by_default(options):
    opts = options()
    assert "dns_names" not in opts.families and not probes.FAMILY_BY_NAME["dns_names"].default
    assert opts.args()["with_dns_names"] is False


def test_with_dns_names_adds_the_family_and_records_it(options):
    opts = options("--with-dns-names")
    assert opts.families[-1] == "dns_names"
    assert opts.args()["with_dns_names"] is True and "dns_names" in opts.args()["probes"]


def test_with_dns_names_adds_to_an_explicit_probe_list_once(options):
    assert options("--probes=tcp_state", "--with-dns-names").families == ("tcp_state", "dns_names")
    assert options("--probes=dns_names", "--with-dns-names").families == ("dns_names",)


def test_dns_names_in_probes_alone_is_recorded_the_same(options):
    assert options("--probes=tcp_state,dns_names").args()["with_dns_names"] is True


def test_help_says_names_are_recorded_and_what_is_not_covered(capsys):
    assert cli.main(["snapshot", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--with-dns-names" in text and "host names processes look up" in text
    assert "Go programs" in text and "dig" in text
