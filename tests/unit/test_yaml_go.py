"""YAML read as Go's yaml.v3 reads it (what mihomo uses), checked against
the mihomo binary: for each quirk, the same file is given to `mihomo -t`
and to Mirage's loader, and both must read the same value (a proxy's
name, proved on mihomo's side by a rule that names it) or both refuse."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ConfigError, load_config
from appliance.config.loader.yaml_source import read_yaml
from appliance.lab.reference import mihomo_binary, mihomo_home

NS = "dns: {nameserver: [192.0.2.53]}\n"


def read(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "y.yaml"
    path.write_text(text)
    return read_yaml(path)[0]


@pytest.mark.parametrize(("text", "value"), [
    ("!<str> 123456", "123456"), ("!!str 123", "123"), ("!custom x", "x"),
    ("yes", "yes"), ("No", "No"), ("on", "on"), ("OFF", "OFF"), ("y", "y"),
    ("true", True), ("False", False), ("TRUE", True),
    ("1:20", "1:20"), ("0o17", 15), ("0755", 493), ("1_000", 1000), ("0x1F", 31),
    ("0b101", 5), ("-12", -12), ("1e3", 1000.0), ("1.5", 1.5), ("=", "="),
    ("!!binary aGk=", "hi"), ("~", None), ("", None), ("Null", None),
    ("99999999999999999999", 1e20), ("089", 89.0),
])  # fmt: skip
def test_plain_scalars_as_yaml_v3_reads_them(tmp_path: Path, text: str, value: Any) -> None:
    got = read(tmp_path, f"a: {text}\n")["a"]
    assert got == value and type(got) is type(value)


def test_special_floats_and_tagged_collections(tmp_path: Path) -> None:
    data = read(tmp_path, "a: .inf\nb: -.Inf\nc: .NaN\nd: !x {k: 1}\ne: !y [1, yes]\n")
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])
    assert data["d"] == {"k": 1} and data["e"] == [1, "yes"]


def test_only_the_first_document_is_read(tmp_path: Path) -> None:
    assert read(tmp_path, "a: 1\n---\nb: [unclosed\n") == {"a": 1}


def test_yaml_11_booleans_still_work_where_a_bool_is_wanted(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(NS + "allow-lan: no\nipv6: yes\nappliance: {dns-hijack: off}\n")
    cfg = load_config(path)
    assert (cfg.allow_lan, cfg.ipv6, cfg.appliance.dns_hijack) == (False, True, False)


# --------------------------------------------------------------------------
# Against the mihomo binary


def mihomo_accepts(tmp_path: Path, text: str) -> bool:
    profile = tmp_path / "mihomo.yaml"
    profile.write_text(text)
    result = subprocess.run([str(mihomo_binary()), "-t", "-d", str(mihomo_home(tmp_path / "h")),
                             "-f", str(profile)], capture_output=True, text=True, timeout=60)
    return "test is successful" in result.stdout


def mirage_loads(tmp_path: Path, text: str) -> bool:
    profile = tmp_path / "mirage.yaml"
    profile.write_text(NS + text)
    try:
        load_config(profile)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("name", [
    "!<str> 123456", "yes", "on", "N", "1:20", "=", "!!binary aGk=", "!custom x",
])  # fmt: skip
def test_a_quirky_name_reads_the_same_in_mihomo(tmp_path: Path, name: str) -> None:
    text = f"proxies:\n  - {{name: {name}, type: socks5, server: 192.0.2.1, port: 1080}}\n"
    read_as = read(tmp_path, text)["proxies"][0]["name"]
    assert isinstance(read_as, str)
    # mihomo finds the proxy under exactly the name Mirage read.
    profile = text + f"rules:\n  - 'MATCH,{read_as}'\n"
    assert mihomo_accepts(tmp_path, profile)
    assert mirage_loads(tmp_path, profile)
    wrong = text + f"rules:\n  - 'MATCH,{read_as}-not'\n"
    assert not mihomo_accepts(tmp_path, wrong)


@pytest.mark.parametrize(("text", "accepted"), [
    # Both read the first document and never parse the rest.
    ("rules: ['MATCH,DIRECT']\n---\nbroken: [\n", True),
    # Both accept a top-level `yes` where a bool belongs.
    ("allow-lan: yes\nrules: ['MATCH,DIRECT']\n", True),
    # Both refuse `?` in an unquoted URL in a flow mapping, tabs, duplicates.
    ("x: {url: http://a.example/b?x=1}\nrules: ['MATCH,DIRECT']\n", False),
    ("x: [http://a.example/b?x=1]\nrules: ['MATCH,DIRECT']\n", False),
    ("proxies:\n\t- {name: a}\nrules: ['MATCH,DIRECT']\n", False),
    ("rules: ['MATCH,DIRECT']\nrules: ['MATCH,DIRECT']\n", False),
])  # fmt: skip
def test_files_both_accept_or_both_refuse(tmp_path: Path, text: str, accepted: bool) -> None:
    assert mihomo_accepts(tmp_path, text) is accepted
    assert mirage_loads(tmp_path, text) is accepted
