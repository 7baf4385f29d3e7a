"""Hostile config inputs (issue 10.3, 10.7): YAML bombs, deep nesting, huge files and floods of unknown keys
are refused quickly and in little memory with one clear ConfigError naming the file, exit status 2; a
fuzz test over YAML shapes and sizes finds nothing but ConfigError."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from ipfixer.config import MAX_LISTED_ERRORS, load_config
from ipfixer.errors import ConfigError, ConfigLimitError
from ipfixer.yamlbound import MAX_ALIASES, MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from tests.cli.helpers import cli_env

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ("config", "schema")  # the interpreter, pydantic and the config models: the cost of starting
GOOD = "collectors: [{address: 127.0.0.1, port: 4739}]\n"


def billion_laughs(width: int = 9, depth: int = 9, key: str = "bogus") -> str:
    """The classic: each level a list of `width` aliases of the one before; 1.1 KB for 9 x 9."""
    lines = ["l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, depth):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return GOOD + "\n".join(lines) + f"\n{key}: *l{depth - 1}\n"


def merge_bomb(depth: int = 20) -> str:
    """Merge keys doubling at each level: `m1: {<<: [*m0, *m0]}` ..."""
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for i in range(1, depth):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: [*m{i - 1}, *m{i - 1}]}}")
    return GOOD + "\n".join(lines) + "\n"


_MEASURE = """
import resource, sys
from ipfixer.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sys.stdout.write(f"\\nMEASURED {ru.ru_utime + ru.ru_stime} {hwm * 1024}\\n")
sys.exit(rc)
"""


def wait4_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float, int]:
    """(exit status, stderr, CPU seconds, peak RSS in bytes) of one `ipfixer` run in a fresh interpreter.

    Measured by the process itself: VmHWM is the peak RSS of its own address space (ru_maxrss of a child
    would include the forked pytest's), resource.getrusage its CPU time."""
    res = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, timeout=120,
                         env=env or cli_env(), cwd=ROOT)
    measured = [line for line in res.stdout.splitlines() if line.startswith("MEASURED ")]
    assert measured, res.stdout + res.stderr
    _, cpu, rss = measured[-1].split()
    return res.returncode, res.stderr, float(cpu), int(rss)


@pytest.fixture(scope="module")
def baseline_rss() -> int:
    """Peak RSS of `ipfixer config schema`: the interpreter, pydantic and yaml themselves."""
    rc, err, _, rss = wait4_cli(*BASELINE)
    assert rc == 0, err
    return rss


HOSTILE = {
    "billion_laughs": billion_laughs(),
    "merge_bomb": merge_bomb(),
    "deep_flow": GOOD + "x: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep_block": GOOD + "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
    "many_anchors": GOOD + "".join(f"a{i}: &a{i} {i}\n" for i in range(MAX_ALIASES + 1)),
    "many_nodes": GOOD + "x: [" + ",".join(["1"] * (MAX_NODES + 1)) + "]\n",
    "huge": GOOD + "# " + "x" * MAX_FILE_BYTES + "\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_refused_fast_and_small(tmp_path: Path, name: str, baseline_rss: int) -> None:
    """Each refused by `ipfixer check` with exit 2 and one line naming the file, in well under a second
    of CPU and under 100 MB peak RSS (the bomb took 45 s and 4.3 GB before)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(HOSTILE[name])
    rc, err, cpu_s, rss = wait4_cli("check", str(path))
    assert rc == 2, err
    assert "Traceback" not in err and str(path) in err
    assert len(err.splitlines()) == 2  # "ipfixer: configuration error:" + the reason
    assert cpu_s < 1.0 + baseline_cpu_allowance(), (name, cpu_s)
    assert rss < 100 * 2**20, (name, rss)
    assert rss < baseline_rss + 30 * 2**20, (name, rss, baseline_rss)


def baseline_cpu_allowance() -> float:
    """Interpreter start-up and imports are not the loader's cost: allow what the shipped config takes."""
    global _BASELINE_CPU
    if _BASELINE_CPU is None:
        _, _, _BASELINE_CPU, _ = wait4_cli(*BASELINE)
    return _BASELINE_CPU


_BASELINE_CPU: float | None = None


def test_bomb_error_says_what_and_where(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    with pytest.raises(ConfigLimitError) as info:
        load_config(path, env={})
    err = info.value
    assert (err.source, err.limit) == (str(path), MAX_NODES) and err.found > MAX_NODES
    assert str(err) == f"{path}: YAML nodes (aliases expanded): {err.found:,} is more than the 50,000 a config may have"
    assert len(path.read_bytes()) < 1200


def test_bomb_in_process_memory(tmp_path: Path) -> None:
    """tracemalloc: refusing the bomb allocates under 4 MB (its expansion would be 387 million nodes)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    tracemalloc.start()
    try:
        with pytest.raises(ConfigLimitError):
            load_config(path, env={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # mostly the bounded read buffer (MAX_FILE_BYTES + 1)


def test_bomb_in_an_environment_variable(tmp_path: Path) -> None:
    """IPFIXER_* values are YAML too: the same bounds, and the error names the variable."""
    levels = ["&l0 [1,1,1,1,1,1,1,1,1]"] + [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigLimitError) as info:
        load_config(path, env={"IPFIXER_COLLECTORS": "[" + ", ".join(levels) + "]"})
    assert info.value.source == "IPFIXER_COLLECTORS" and info.value.found > MAX_NODES


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "x: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=r"alias \*a is inside the node it refers to"):
        load_config(path, env={})


def test_modest_aliases_still_work(tmp_path: Path) -> None:
    """Anchors and merge keys have real uses (collectors sharing settings): a few are fine."""
    path = tmp_path / "c.yaml"
    path.write_text("collectors:\n"
                    "  - &first {address: 127.0.0.1, port: 4739, protocol: netflow9, max_message_size: 1400}\n"
                    "  - {<<: *first, address: 127.0.0.2}\n")
    cfg = load_config(path, env={})
    assert [(c.address, c.port, c.protocol, c.max_message_size) for c in cfg.collectors] == [
        ("127.0.0.1", 4739, "netflow9", 1400), ("127.0.0.2", 4739, "netflow9", 1400)]


def test_depth_limit_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")  # top mapping + 31
    assert "x: unknown key" in error_text(path)
    path.write_text(GOOD + "x: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    with pytest.raises(ConfigLimitError) as info:
        load_config(path, env={})
    assert (info.value.what, info.value.found) == ("nesting depth", MAX_DEPTH + 1)


def error_text(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return str(info.value)


# ------------------------------------------------------------------------------------ error list cap


def test_unknown_keys_listed_up_to_a_cap(tmp_path: Path) -> None:
    """20,000 unknown keys: 20 listed, the rest counted in one line (was 15 MB of errors for 105,000)."""
    n = 20_000
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "".join(f"unknown_{i}: 1\n" for i in range(n)))
    lines = error_text(path).splitlines()
    assert len(lines) == MAX_LISTED_ERRORS + 1
    assert lines[0] == f"{path}: unknown_0: unknown key (got 1)"
    assert lines[-1] == f"{path}: ... and {n - 20:,} more errors ({n:,} in all; the first 20 are listed)"


def test_105000_unknown_keys_at_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "".join(f"unknown_{i}: 1\n" for i in range(105_000)))
    rc, err, _, _ = wait4_cli("check", str(path))
    assert rc == 2 and str(path) in err and len(err) < 2000, err[:3000]


def test_few_errors_are_all_listed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "".join(f"unknown_{i}: 1\n" for i in range(MAX_LISTED_ERRORS)))
    lines = error_text(path).splitlines()
    assert len(lines) == MAX_LISTED_ERRORS and "more errors" not in lines[-1]


def test_environment_errors_count_towards_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    env = {f"IPFIXER_NOPE{i}": "1" for i in range(30)}
    lines = error_text_env(path, env).splitlines()
    assert len(lines) == 21 and lines[-1].endswith("... and 10 more errors (30 in all; the first 20 are listed)")


def error_text_env(path: Path, env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    return str(info.value)


def test_huge_bad_value_is_shown_short(tmp_path: Path) -> None:
    """A bad value that is a big structure is shown abbreviated, not printed whole."""
    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "sampling: [" + ",".join(["[1,2,3,4,5,6]"] * 5000) + "]\n")
    (line,) = error_text(path).splitlines()
    assert line.startswith(f"{path}: sampling: must be a mapping (got [[1, 2, 3, 4, ...], ") and len(line) < 200


# -------------------------------------------------------------------------------------------- fuzz

_KEYS = st.sampled_from(["collectors", "address", "port", "timeouts", "idle", "active", "cache", "<<", "x",
                         "sampling", "interval", "metrics", "listen", "log_level", "interfaces", "include"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=30), st.sampled_from(["127.0.0.1", "30s", "::1", "999.1.2.3", "ipfix"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=8), st.dictionaries(st.one_of(_KEYS, st.text(max_size=8)), inner, max_size=8)),
    max_leaves=60)
_YAML_CHARS = st.text(alphabet=st.sampled_from(list("&*!<>:-[]{},|'\"#%@` \n\t?abc019.")), max_size=300)


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    """Valid YAML of random shape, raw YAML-ish noise, alias trees of random width x depth, deep nests."""
    kind = draw(st.sampled_from(["dump", "noise", "aliases", "deep", "dump+noise"]))
    if kind == "dump":
        return yaml.safe_dump(draw(_VALUES), default_flow_style=draw(st.sampled_from([None, True, False])))
    if kind == "noise":
        return draw(_YAML_CHARS)
    if kind == "aliases":
        return billion_laughs(draw(st.integers(1, 14)), draw(st.integers(1, 14)),
                              key=draw(st.sampled_from(["bogus", "collectors", "timeouts", "<<"])))
    if kind == "deep":
        n = draw(st.integers(1, 3 * MAX_DEPTH))
        return GOOD + "x: " + draw(st.sampled_from(["[", "{a: "])) * n + "1\n"
    text = yaml.safe_dump(draw(_VALUES))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(_YAML_CHARS) + text[at:]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_documents())
def test_fuzz_loader_only_config_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """Any text: a Config or a ConfigError, never another exception; memory bounded (tracemalloc)."""
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    tracemalloc.start()
    try:
        try:
            load_config(path, env={})
        except ConfigError as exc:
            assert str(exc) and len(str(exc)) < 20_000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_documents())
def test_fuzz_cli_check_exit_0_or_2(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """The same shapes through `ipfixer check`: exit 0 or 2, no traceback, bounded CPU and RSS."""
    path = tmp_path_factory.mktemp("fuzzcli") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    rc, err, cpu_s, rss = wait4_cli("check", str(path))
    assert rc in (0, 2) and "Traceback" not in err, err[-3000:]
    assert rss < 150 * 2**20 and cpu_s < 30
