"""The start-up agreement of multi-host runs (sharding.agree / fail / agree_values), with the coordination
service's key-value store replaced by an in-memory one and each host a thread: every host raises the same
one-line error naming the failing host, of the failing host's kind, whichever host fails and wherever."""

import json
import threading
import time

import pytest

from qwen2vl_jax import sharding
from qwen2vl_jax.data import DataError
from qwen2vl_jax.storage import StorageError
from qwen2vl_jax.train.config import RunConfigError

KINDS = {c.__name__: c for c in (DataError, RunConfigError, StorageError)}


class KV:
    """The calls of jax's DistributedRuntimeClient that the agreement uses, with its error texts."""

    def __init__(self):
        self.d, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            if key in self.d and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists")
            self.d[key] = value

    def key_value_try_get(self, key):
        with self.lock:
            if key not in self.d:
                raise RuntimeError(f"NOT_FOUND: {key} not found")
            return self.d[key]

    def blocking_key_value_get(self, key, timeout_ms):
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            with self.lock:
                if key in self.d:
                    return self.d[key]
            time.sleep(0.01)
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")


def hosts_run(monkeypatch, *bodies):
    """Run body(i) as host i of len(bodies), each in its own thread; [(returned, raised)] per host."""
    kv, local = KV(), threading.local()
    monkeypatch.setattr(sharding, "hosts", lambda: local.h)
    out = [None] * len(bodies)

    def host(i):
        local.h = sharding._Hosts(kv, i, len(bodies))
        try:
            out[i] = (bodies[i](i), None)
        except Exception as e:
            out[i] = (None, e)
    threads = [threading.Thread(target=host, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a host is still waiting"
    return out


def test_all_well_returns_every_hosts_value(monkeypatch):
    out = hosts_run(monkeypatch, *[lambda i: sharding.agree("s", None, KINDS, f"v{i}")] * 3)
    assert out == [(["v0", "v1", "v2"], None)] * 3


def test_an_error_on_one_host_is_raised_on_every_host_as_its_kind(monkeypatch):
    def body(i):
        error = DataError("a.jsonl:4: not valid JSON") if i == 1 else None
        sharding.agree("data check", error, KINDS)
    out = hosts_run(monkeypatch, body, body)
    errors = [e for _, e in out]
    assert all(type(e) is DataError for e in errors)
    assert [str(e) for e in errors] == ["host 1 of 2: a.jsonl:4: not valid JSON"] * 2
    assert errors[1].__cause__ is not None and errors[0].__cause__ is None   # the failing host keeps its own


def test_errors_on_several_hosts_name_the_first_and_count_the_others(monkeypatch):
    def body(i):
        sharding.agree("s", StorageError(f"gs://b/{i}: access denied") if i else None, KINDS)
    out = hosts_run(monkeypatch, body, body, body)
    assert {str(e) for _, e in out} == {"host 1 of 3 (and 1 more host): gs://b/1: access denied"}


def test_a_host_failing_between_agreement_points_ends_the_others_waiting_at_the_next(monkeypatch):
    """Host 1 fails with an unexpected exception before it reaches the agreement point where host 0 waits:
    both raise HostFailed with the same line; only host 1 holds the traceback."""
    def body(i):
        sharding.agree("first", None, KINDS)
        try:
            if i == 1:
                {}["vision_tower"]
            sharding.agree("second", None, KINDS)
        except Exception as e:
            sharding.fail(e, KINDS)
    out = hosts_run(monkeypatch, body, body)
    errors = [e for _, e in out]
    assert all(type(e) is sharding.HostFailed for e in errors)
    assert [str(e) for e in errors] == ["host 1 of 2: KeyError: 'vision_tower'"] * 2
    assert isinstance(errors[1].__cause__, KeyError) and errors[0].__cause__ is None


def test_the_first_verdict_stands_for_every_host(monkeypatch):
    def body(i):
        time.sleep(0.2 * i)
        try:
            raise RunConfigError(f"bad value on host {i}")
        except Exception as e:
            sharding.fail(e, KINDS)
    out = hosts_run(monkeypatch, body, body, body)
    assert [str(e) for _, e in out] == ["host 0 of 3: bad value on host 0"] * 3


def test_hosts_at_different_start_up_steps_fail_together(monkeypatch):
    out = hosts_run(monkeypatch, lambda i: sharding.agree("checkpoint", None, KINDS),
                    lambda i: sharding.agree("model", None, KINDS))
    lines = {str(e) for _, e in out}
    assert len(lines) == 1 and lines.pop().startswith(
        "host 1 of 2: reached start-up step 'model' where host 0 reached 'checkpoint'")


def test_agree_values_names_the_host_that_differs(monkeypatch):
    def body(i):
        return sharding.agree_values("checkpoint", "200" if i != 2 else "None",
                                     lambda h, mine, first: f"sees {mine} where host 0 sees {first}", KINDS)
    out = hosts_run(monkeypatch, body, body, body)
    assert all(type(e) is RunConfigError for _, e in out)
    assert {str(e) for _, e in out} == {"host 2 of 3: sees None where host 0 sees 200"}
    out = hosts_run(monkeypatch, *[lambda i: sharding.agree_values("c", "7", None, KINDS)] * 2)
    assert out == [("7", None)] * 2


def test_one_process_raises_its_own_error():
    e = DataError("x")
    with pytest.raises(DataError) as got:
        sharding.agree("s", e)
    assert got.value is e
    assert sharding.agree("s", None, value="v") == ["v"]
    with pytest.raises(KeyError):
        try:
            {}["k"]
        except KeyError as err:
            sharding.fail(err, KINDS)


def test_the_watcher_ends_a_host_stuck_in_a_collective_with_the_verdict(monkeypatch):
    """A host whose main thread never reaches an agreement point (it waits in a collective) is ended by its
    HostWatch with the verdict's line and the kind's exit code, about a heartbeat after it was posted."""
    import io
    import os
    kv = KV()
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding.jax, "process_index", lambda: 0)
    monkeypatch.setattr(sharding, "_hosts", None)
    monkeypatch.setattr(sharding, "HEARTBEAT_S", 0.2)
    from jax._src import distributed
    monkeypatch.setattr(distributed.global_state, "client", kv)
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    out = io.StringIO()
    watch = sharding.HostWatch(out=out, code=lambda kind: 2 if kind in KINDS else 1)
    kv.key_value_set(sharding.VERDICT, "1\nStorageError\nhost 1 of 2: /ckpt: no such directory")
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.done()
    assert exits[:1] == [2]
    assert out.getvalue().splitlines()[0] == "train.py: host 1 of 2: /ckpt: no such directory"


def test_train_py_compares_configs_without_host_local_keys():
    train = _train_script()
    from qwen2vl_jax.train.config import load
    a = load(None, ["compile_cache=/tmp/a", "progress=false"])
    b = load(None, ["compile_cache=/tmp/b", "optim.lr=0.001"])
    assert train.fingerprint(a) == train.fingerprint(load(None, ["compile_cache=/tmp/c"]))
    text = train.config_difference(1, train.fingerprint(b), train.fingerprint(a))
    assert text.startswith("its run config differs from host 0's: optim.lr=0.001 (host 0: 0.0001)"), text
    assert "compile_cache" not in text and json.loads(train.fingerprint(a))["mesh.fsdp"] == -1


def _train_script():
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "train_script", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


@pytest.mark.parametrize("failing_host", [True, False])
def test_train_py_prints_an_unexpected_start_up_error_in_one_line_and_the_traceback_on_its_host(
        monkeypatch, capsys, failing_host):
    from qwen2vl_jax.train import loop

    def run(cfg):
        try:
            {}["vision_tower"]
        except KeyError as e:
            err = sharding.HostFailed("host 1 of 2: KeyError: 'vision_tower'")
            raise err from (e if failing_host else None)
    monkeypatch.setattr(loop, "run", run)
    assert _train_script().main(["steps=1"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "train.py: host 1 of 2: KeyError: 'vision_tower'"
    assert [line for line in err if line.startswith("train.py:")] == err[-1:]
    assert ("Traceback (most recent call last):" in err) == failing_host


def test_train_py_exits_2_with_one_line_for_an_agreed_project_error(monkeypatch, capsys):
    from qwen2vl_jax.train import loop

    def run(cfg):
        raise StorageError("host 1 of 2: base: no such directory")
    monkeypatch.setattr(loop, "run", run)
    assert _train_script().main(["steps=1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["train.py: host 1 of 2: base: no such directory"]


def test_a_message_of_several_lines_becomes_one():
    assert sharding.one_line("2 bad records:\n  a.jsonl:1: x\n  a.jsonl:2: y\n") == "2 bad records: a.jsonl:1: x; a.jsonl:2: y"
